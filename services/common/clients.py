"""How one Parley service calls another: channels and internal credentials."""

from __future__ import annotations

import json

import grpc

from services.common.interceptors import WORKSPACE_HEADER

# The largest message a channel sends or receives. Every service's server takes messages of
# the same size (server.py), so a request the client lets out is never refused by its peer;
# callers that build large requests (ingest's forwarding) size them under this.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# A call a peer answers UNAVAILABLE is made again, on another replica: a replica shutting down
# refuses new calls with it (interceptors.ChassisInterceptor.drain), and a replica whose health
# says NOT_SERVING is left out of the rotation (healthCheckConfig). Every call one service makes
# to another is safe to repeat, even when an answer was lost after the work was done: reads,
# and writes keyed by message or request ids, which find the first attempt's result. Retries
# are throttled (gRPC's token bucket), so a peer answering UNAVAILABLE under load is not met
# with three times the calls at every hop.
_SERVICE_CONFIG = json.dumps(
    {
        "healthCheckConfig": {"serviceName": ""},
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)

# Keep channels alive across idle periods and fail fast when a peer is down.
_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Calls spread over every address the peer's name resolves to (a service scaled to N
    # replicas behind one DNS name); gRPC's default would send all of them to the first.
    ("grpc.lb_policy_name", "round_robin"),
)
_RETRYING = (
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE_BYTES),
)


def internal_metadata(token: str, workspace_id: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata for a service-to-service call, in one workspace or (None) across all of them."""
    md: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),)
    if workspace_id:
        md += ((WORKSPACE_HEADER, workspace_id),)
    return md


def key_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    """Metadata for a call made with a workspace API key."""
    return (("authorization", f"Bearer {api_key}"),)


def channel(addr: str, *, retry: bool = True) -> grpc.aio.Channel:
    """An insecure channel to a peer on the private network; with ``retry``, calls answered
    UNAVAILABLE are made again (for callers whose every call is safe to repeat: see above)."""
    return grpc.aio.insecure_channel(addr, options=_CHANNEL_OPTIONS + (_RETRYING if retry else ()))
