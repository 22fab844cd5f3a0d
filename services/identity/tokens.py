"""Opaque page tokens and stream cursors: what they hold, how they are written and checked."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
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
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # nested past the parser's depth
        raise InvalidArgument.field(field, _NOT_OURS) from exc
    return position


_NOT_OURS = "not a page token of this query"
_INT64 = 2**63


def _aware_time(value: Any) -> datetime:
    """An ISO time with its offset, one PostgreSQL's timestamptz can hold (years 1-9999 in UTC)."""
    if not isinstance(value, str):
        raise TypeError
    at = datetime.fromisoformat(value)
    if at.tzinfo is None:
        raise ValueError
    return at.astimezone(UTC)  # OverflowError past the years a datetime holds


def time_text(at: datetime) -> str:
    """A position's time as a token holds it, always with its offset: asyncpg reads PostgreSQL's
    infinite timestamps (what the largest and smallest datetimes are written as) without one."""
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).isoformat()


def time_and_id(position: list[Any], field: str = "page_token") -> tuple[datetime, uuid.UUID]:
    """A (time, id) keyset position read back from a page token."""
    try:
        at, ident = position
        if not isinstance(ident, str):
            raise TypeError
        return _aware_time(at), uuid.UUID(ident)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument.field(field, _NOT_OURS) from exc


def time_and_seq(position: list[Any], field: str = "page_token") -> tuple[datetime, int]:
    """A (time, stream sequence) keyset position read back from a page token."""
    try:
        at, seq = position
        if type(seq) is not int or not 0 <= seq < _INT64:
            raise TypeError
        return _aware_time(at), seq
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument.field(field, _NOT_OURS) from exc


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
            # xid8 and bigint: what PostgreSQL can compare them with.
            if not (0 <= cursor.xid < 2 * _INT64 and 0 <= cursor.seq < _INT64):
                raise ValueError
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument.field("cursor", "not a cursor of this stream") from exc
        return cursor
