"""Which failures of a peer's answer leave a campaign step to retry, and which end it."""

from __future__ import annotations

import grpc
import pytest

from services.campaign.effects import _failure


def _error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="peer said so")


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        # A stopping peer answers calls it took but never ran CANCELLED: nothing was done.
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    ],
)
def test_transient_failures_are_retried(code: grpc.StatusCode) -> None:
    result = _failure(_error(code))
    assert result.status == "retry"
    assert result.detail == f"{code.name}: peer said so"


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED],
)
def test_refusals_end_the_step(code: grpc.StatusCode) -> None:
    assert _failure(_error(code)).status == "failed"
