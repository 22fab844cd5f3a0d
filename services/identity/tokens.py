"""Opaque page tokens and stream cursors: what they hold, how they are written and checked."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument


def fingerprint(*parts: Any) -> str:
    """A short digest of the query a page token belongs to, so it cannot be replayed against another."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_page_token(query: str, position: list[Any]) -> str:
    raw = json.dumps({"q": query, "p": position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, query: str, field: str = "page_token") -> list[Any] | None:
    """The position a token holds, None for ''; INVALID_ARGUMENT naming ``field`` when it is not ours."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        position = data["p"]
        if not isinstance(position, list) or data["q"] != query:
            raise ValueError
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument.field(field, "not a page token of this query") from exc
    return position


@dataclass(frozen=True, order=True)
class Cursor:
    """Stream position: everything at or before (xid, seq) was delivered; rows order by (xid, seq)."""

    xid: int = 0
    seq: int = 0

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"v1:{self.xid}:{self.seq}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        if not text:
            return cls()
        try:
            version, xid, seq = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode().split(":")
            if version != "v1":
                raise ValueError
            cursor = cls(int(xid), int(seq))
            if cursor.xid < 0 or cursor.seq < 0:
                raise ValueError
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument.field("cursor", "not a cursor of this stream") from exc
        return cursor
