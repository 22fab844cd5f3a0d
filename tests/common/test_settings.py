"""Settings from PARLEY_* variables: defaults, types, and peers that follow moved ports."""

from __future__ import annotations

import pytest

from services.common.settings import Settings, load_settings


def test_defaults() -> None:
    s = load_settings({})
    assert s == Settings()
    assert (s.identity_port, s.identity_addr) == (50052, "127.0.0.1:50052")


def test_a_moved_port_moves_the_peer_address() -> None:
    s = load_settings({"PARLEY_IDENTITY_PORT": "6052", "PARLEY_MESSAGING_HTTP_PORT": "9081"})
    assert s.identity_addr == "127.0.0.1:6052"
    assert s.public_base_url == "http://127.0.0.1:9081"
    assert s.ingest_addr == "127.0.0.1:50051"  # untouched peers keep their defaults


def test_an_address_set_wins_over_the_port() -> None:
    env = {
        "PARLEY_IDENTITY_PORT": "6052",
        "PARLEY_IDENTITY_ADDR": "identity:50052",
        "PARLEY_MESSAGING_HTTP_PORT": "9081",
        "PARLEY_PUBLIC_BASE_URL": "https://hooks.example.com",
    }
    s = load_settings(env)
    assert (s.identity_port, s.identity_addr) == (6052, "identity:50052")
    assert s.public_base_url == "https://hooks.example.com"


def test_a_malformed_value_names_its_variable() -> None:
    with pytest.raises(ValueError, match="PARLEY_IDENTITY_PORT='x'"):
        load_settings({"PARLEY_IDENTITY_PORT": "x"})
