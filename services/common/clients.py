"""How one Parley service calls another: channels and internal credentials."""

from __future__ import annotations

import json

import grpc

from services.common.interceptors import WORKSPACE_HEADER

# The largest message a channel sends or receives. Every service's server takes messages of
# the same size (server.py), so a request the client lets out is never refused by its peer;
# callers that build large requests (ingest's forwarding) size them under this.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# A call a peer answers UNAVAILABLE is made again, on the next replica: Parley's UNAVAILABLE
# means nothing was done (a replica shutting down refuses new calls with it, see
# interceptors.ChassisInterceptor.drain), and every call between services is safe to repeat
# (reads; writes carry message or request ids). gRPC keeps up to a whole message to resend it.
_SERVICE_CONFIG = json.dumps(
    {
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
        ]
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


def channel(addr: str) -> grpc.aio.Channel:
    """An insecure channel to a peer on the private network."""
    return grpc.aio.insecure_channel(addr, options=_CHANNEL_OPTIONS)
