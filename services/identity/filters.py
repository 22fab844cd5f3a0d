"""Audience filters: proto PropertyFilters checked and turned into conditions the repository compiles."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from parley.common.v1.contact_pb2 import FilterOperator, PropertyFilter

from services.common.errors import InvalidArgument, Violation

MAX_FILTERS = 20
# Parts of a dotted key. Stored properties nest at most 8 deep (ingest's limit), so a longer path
# can match nothing; the bound keeps the containment object built from it (``repository``)
# within what the JSON encoder nests.
MAX_KEY_PARTS = 32

_OPS = {
    FilterOperator.FILTER_OPERATOR_EQ: "eq",
    FilterOperator.FILTER_OPERATOR_NEQ: "neq",
    FilterOperator.FILTER_OPERATOR_GT: "gt",
    FilterOperator.FILTER_OPERATOR_GTE: "gte",
    FilterOperator.FILTER_OPERATOR_LT: "lt",
    FilterOperator.FILTER_OPERATOR_LTE: "lte",
    FilterOperator.FILTER_OPERATOR_EXISTS: "exists",
    FilterOperator.FILTER_OPERATOR_NOT_EXISTS: "not_exists",
    FilterOperator.FILTER_OPERATOR_CONTAINS: "contains",
    FilterOperator.FILTER_OPERATOR_IN: "in",
}


@dataclass(frozen=True)
class Condition:
    """One checked condition: a key path into the contact's properties, an operator, an operand."""

    path: list[str]
    op: str
    value: Any = None


def conditions(filters: Sequence[PropertyFilter], field: str = "filters") -> list[Condition]:
    """Check every filter; INVALID_ARGUMENT lists each bad one as ``filters[i].key|operator|value``."""
    if len(filters) > MAX_FILTERS:
        raise InvalidArgument.field(field, f"at most {MAX_FILTERS} filters")
    out: list[Condition] = []
    bad: list[Violation] = []
    for i, f in enumerate(filters):
        name = f"{field}[{i}]"
        path = f.key.split(".") if f.key else []
        if not path or any(not part for part in path):
            bad.append(Violation(f"{name}.key", "required: a property name or dotted path like address.city"))
        elif len(path) > MAX_KEY_PARTS:
            bad.append(Violation(f"{name}.key", f"at most {MAX_KEY_PARTS} dotted parts"))
        op = _OPS.get(f.operator)
        if op is None:
            bad.append(Violation(f"{name}.operator", "unknown or unspecified operator"))
            continue
        has_value = f.HasField("value") and f.value.WhichOneof("kind") not in (None, "null_value")
        value = json_format.MessageToDict(f.value) if has_value else None
        if op in ("exists", "not_exists"):
            value = None
        elif not has_value:
            bad.append(Violation(f"{name}.value", f"required for {FilterOperator.Name(f.operator)}"))
            continue
        elif op in ("gt", "gte", "lt", "lte") and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
            bad.append(Violation(f"{name}.value", "must be a number or a string for an ordering comparison"))
            continue
        elif op == "in" and not isinstance(value, list):
            bad.append(Violation(f"{name}.value", "must be a list for FILTER_OPERATOR_IN"))
            continue
        elif op == "contains" and isinstance(value, (dict, list)):
            bad.append(Violation(f"{name}.value", "must be a string, number or boolean for FILTER_OPERATOR_CONTAINS"))
            continue
        if path:
            out.append(Condition(path, op, value))
    if bad:
        raise InvalidArgument(bad)
    return out
