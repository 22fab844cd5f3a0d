"""What Postgres text and jsonb cannot hold: NUL characters, and NaN or infinite numbers."""

from __future__ import annotations

import math
from collections.abc import Iterator

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import ListValue, Struct, Value

NUL = "must not contain NUL characters"
UNSTORABLE = "must not contain NUL characters or NaN/infinite numbers"

_JSON_TYPES = frozenset({"google.protobuf.Value", "google.protobuf.Struct", "google.protobuf.ListValue"})


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


def unstorable_fields(message: Message, path: str = "") -> Iterator[str]:
    """Paths (``a.b[2].c``) of the set fields of ``message`` that hold what Postgres cannot:
    strings with NUL, JSON values (Struct, Value, ListValue) with NUL or NaN/infinite numbers."""
    for field, value in message.ListFields():
        here = f"{path}.{field.name}" if path else field.name
        repeated = bool(field.is_repeated)
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            value_field = kind.fields_by_name["value"]
            for key, item in value.items():
                at = f"{here}[{key!r}]"
                if isinstance(key, str) and "\x00" in key:
                    yield at
                elif value_field.message_type is not None:
                    yield from _message(item, value_field.message_type.full_name, at)
                elif isinstance(item, str) and "\x00" in item:
                    yield at
        elif kind is not None:
            items = list(value) if repeated else [value]
            for i, item in enumerate(items):
                yield from _message(item, kind.full_name, f"{here}[{i}]" if repeated else here)
        elif field.type == FieldDescriptor.TYPE_STRING:
            items = list(value) if repeated else [value]
            for i, item in enumerate(items):
                if "\x00" in item:
                    yield f"{here}[{i}]" if repeated else here


def _message(item: Message, full_name: str, at: str) -> Iterator[str]:
    if full_name in _JSON_TYPES:
        if unstorable(item):  # type: ignore[arg-type]
            yield at
    else:
        yield from unstorable_fields(item, at)
