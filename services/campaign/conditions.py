"""Property conditions, with the operators and semantics of identity's ListContacts filters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from google.protobuf import json_format
from parley.common.v1 import contact_pb2

from services.common.numeric import LIST_INDEX, numeric_value

Op = contact_pb2.FilterOperator
KNOWN_OPERATORS = frozenset(v for v in Op.values() if v != Op.FILTER_OPERATOR_UNSPECIFIED)
VALUELESS = frozenset({Op.FILTER_OPERATOR_EXISTS, Op.FILTER_OPERATOR_NOT_EXISTS})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(v: Any) -> Decimal | None:
    """A JSON number, or a string that is a plain decimal number (event properties often carry
    amounts as text), exactly, as PostgreSQL's numeric reads them; None for anything else."""
    if _is_number(v):
        return Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
    if isinstance(v, str):
        return numeric_value(v)
    return None


def _cmp(actual: Any, want: Any) -> int | None:
    # As identity's SQL orders: a number operand with numbers and numeric strings, a string
    # operand with strings (lexically: ISO dates order correctly); nothing else is ordered.
    if _is_number(want):
        a, w = _number(actual), _number(want)
        return None if a is None or w is None else (a > w) - (a < w)
    if isinstance(want, str) and isinstance(actual, str):
        return (actual > want) - (actual < want)
    return None


def _eq(a: Any, b: Any) -> bool:
    """JSON equality, as jsonb's: 3 equals 3.0 (JSON numbers arrive as floats), true does not equal 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


_MISSING = object()


def _at(data: Any, path: list[str]) -> Any:
    """The value at a dotted path, as PostgreSQL's ``#>`` finds it: a key of an object, or an
    integer (negative from the end) indexing a list; ``_MISSING`` when nothing is there (a JSON
    null is there)."""
    cur = data
    for key in path:
        if isinstance(cur, Mapping):
            if key not in cur:
                return _MISSING
            cur = cur[key]
        elif isinstance(cur, list):
            if LIST_INDEX.fullmatch(key) is None:
                return _MISSING
            index = int(key)
            if not -len(cur) <= index < len(cur):
                return _MISSING
            cur = cur[index]
        else:
            return _MISSING
    return cur


def matches(f: contact_pb2.PropertyFilter, data: Mapping[str, Any]) -> bool:
    """Whether ``data`` (properties) meets the filter; a missing key meets only NOT_EXISTS/NEQ."""
    actual = _at(data, f.key.split(".")) if f.key else _MISSING
    want = json_format.MessageToDict(f.value) if f.HasField("value") else None
    op = f.operator
    if op == Op.FILTER_OPERATOR_EXISTS:
        return actual is not _MISSING
    if op == Op.FILTER_OPERATOR_NOT_EXISTS:
        return actual is _MISSING
    if op == Op.FILTER_OPERATOR_NEQ:
        return actual is _MISSING or not _eq(actual, want)
    if actual is _MISSING or actual is None:
        return False
    if op == Op.FILTER_OPERATOR_EQ:
        return _eq(actual, want)
    if op == Op.FILTER_OPERATOR_IN:
        return isinstance(want, list) and any(_eq(actual, w) for w in want)
    if op == Op.FILTER_OPERATOR_CONTAINS:
        if isinstance(actual, str):
            return isinstance(want, str) and want.lower() in actual.lower()
        if isinstance(actual, list):
            return any(_eq(a, want) for a in actual)
        return False
    c = _cmp(actual, want)
    if c is None:
        return False
    return {
        Op.FILTER_OPERATOR_GT: c > 0,
        Op.FILTER_OPERATOR_GTE: c >= 0,
        Op.FILTER_OPERATOR_LT: c < 0,
        Op.FILTER_OPERATOR_LTE: c <= 0,
    }.get(op, False)


def all_match(filters: Sequence[contact_pb2.PropertyFilter], data: Mapping[str, Any]) -> bool:
    return all(matches(f, data) for f in filters)


def filter_problem(f: contact_pb2.PropertyFilter, *, key_required: bool = True) -> tuple[str, str] | None:
    """(sub-field, description) of what is wrong with a filter, or None."""
    if key_required and not f.key:
        return "key", "required"
    if f.operator not in KNOWN_OPERATORS:
        return "operator", ("unknown operator; use one of eq, neq, gt, gte, lt, lte, exists, not_exists, contains, in")
    if f.operator in VALUELESS:
        return None
    if not f.HasField("value"):
        return "value", "required for this operator"
    if f.operator == Op.FILTER_OPERATOR_IN and not f.value.HasField("list_value"):
        return "value", "must be a list for operator in"
    return None
