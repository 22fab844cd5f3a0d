"""The structure rules as three plain walks: what ingest's one-walk screens must answer."""

from __future__ import annotations

import math

from google.protobuf.struct_pb2 import ListValue, Struct

from services.ingest.normalize import _CONTAINERS


def too_deep(root: Struct, max_depth: int) -> bool:
    """True when ``root`` nests objects/lists more than ``max_depth`` levels (``root`` itself is level 1)."""
    stack: list[tuple[Struct | ListValue, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Struct):
            fields = node.fields
            values = [fields[key] for key in fields]
        else:
            values = list(node.values)
        for value in values:
            kind = value.WhichOneof("kind")
            if kind in _CONTAINERS:
                if depth >= max_depth:
                    return True
                stack.append((getattr(value, kind), depth + 1))
    return False


def has_nul(root: Struct) -> bool:
    """True when a key or string anywhere in ``root`` holds a NUL character, which Postgres text
    and jsonb cannot store (identity and later consumers would fail on it)."""
    stack: list[Struct | ListValue] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Struct):
            fields = node.fields
            if any("\x00" in key for key in fields):
                return True
            values = [fields[key] for key in fields]
        else:
            values = list(node.values)
        for value in values:
            kind = value.WhichOneof("kind")
            if kind == "string_value":
                if "\x00" in value.string_value:
                    return True
            elif kind in _CONTAINERS:
                stack.append(getattr(value, kind))
    return False


def has_non_finite(root: Struct) -> bool:
    """True when ``root`` holds a NaN or infinite number anywhere: JSON, and so what identity
    stores, has no such value, and one would fail the whole batch there."""
    stack: list[Struct | ListValue] = [root]
    while stack:
        node = stack.pop()
        values = [node.fields[key] for key in node.fields] if isinstance(node, Struct) else list(node.values)
        for value in values:
            kind = value.WhichOneof("kind")
            if kind == "number_value":
                if not math.isfinite(value.number_value):
                    return True
            elif kind in _CONTAINERS:
                stack.append(getattr(value, kind))
    return False
