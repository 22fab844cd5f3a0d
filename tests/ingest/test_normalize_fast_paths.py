"""The batch path's shortcuts give the answers of the plain rules: the structure screens with one
walk or loop."""

from __future__ import annotations

import random
import struct as struct_module
from typing import Any

import pytest
from google.protobuf.struct_pb2 import Struct, Value

from services.ingest.normalize import _struct_problems
from tests.ingest.struct_walks import has_non_finite, has_nul, too_deep
from tests.ingest.test_normalize import nested, struct

# Bytes that are tags, lengths or number parts in a serialized Struct, in keys and strings.
_CHARS = "ab2*\x00\x09\x11\x12\x0a\x1a \u00e9\x7f\u00ff"


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(rng.choice([0, 1, 2, 5, 9, 17, 42, 50, 130])))


def _number(rng: random.Random) -> float:
    roll = rng.random()
    if roll < 0.1:
        return rng.choice([float("nan"), float("inf"), float("-inf")])
    if roll < 0.4:
        return float(rng.randrange(-5, 100))  # whole numbers are mostly zero bytes
    return float(struct_module.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0])


def _value(rng: random.Random, depth: int, nest: bool) -> Any:
    roll = rng.random()
    if nest and depth < 10 and roll < 0.15:
        return _object(rng, depth + 1, nest)
    if nest and depth < 10 and roll < 0.25:
        return [_value(rng, depth + 1, nest) for _ in range(rng.randrange(4))]
    if roll < 0.5:
        return _text(rng)
    if roll < 0.8:
        return _number(rng)
    return rng.choice([True, False, None])


def _object(rng: random.Random, depth: int, nest: bool) -> dict[str, Any]:
    return {_text(rng): _value(rng, depth, nest) for _ in range(rng.randrange(5))}


@pytest.mark.parametrize("nest", [False, True])
def test_the_screens_agree_with_the_walks(nest: bool) -> None:
    rng = random.Random(int(nest))
    for _ in range(1500):
        s = struct(_object(rng, 1, nest))
        for max_depth in (1, 2, 8):
            expected = (too_deep(s, max_depth), has_non_finite(s), has_nul(s))
            assert _struct_problems(s, max_depth) == expected, s


@pytest.mark.parametrize("unknown_first", [False, True])
def test_a_value_with_unknown_fields_still_shows_its_nesting(unknown_first: bool) -> None:
    # An unknown field (number 9, three bytes) beside a nested object: the kind's tag is written
    # first whatever order the client sent, which the container screen relies on.
    inner = Value(struct_value=struct(nested(3))).SerializeToString()
    unknown = b"\x4a\x03\x2a\x00\x11"
    value = Value.FromString(unknown + inner if unknown_first else inner + unknown)
    s = Struct()
    s.fields["k"].CopyFrom(value)
    assert s.fields["k"].SerializeToString().startswith(b"\x2a")
    for max_depth in (1, 3, 4):
        assert _struct_problems(s, max_depth)[0] == too_deep(s, max_depth) == (max_depth < 4)
