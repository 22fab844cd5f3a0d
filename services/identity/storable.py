"""What Postgres text and jsonb cannot hold: NUL characters, and NaN or infinite numbers."""

from __future__ import annotations

import math

from google.protobuf.struct_pb2 import ListValue, Struct, Value

NUL = "must not contain NUL characters"


def unstorable(value: Struct | ListValue | Value) -> bool:
    """True when a key or string holds a NUL, or a number is NaN or infinite, anywhere in ``value``."""
    if isinstance(value, Struct):
        return any("\x00" in k or unstorable(v) for k, v in value.fields.items())
    if isinstance(value, ListValue):
        return any(unstorable(v) for v in value.values)
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return "\x00" in value.string_value
    if kind == "number_value":
        return not math.isfinite(value.number_value)
    if kind == "struct_value":
        return unstorable(value.struct_value)
    if kind == "list_value":
        return unstorable(value.list_value)
    return False
