"""docker-compose.yml agrees with the settings module: ports, variables, peers and health checks."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import yaml

from services.common.settings import PROJECT_ROOT, Settings

SERVICES = {"ingest", "identity", "campaign", "messaging"}
DEFAULTS = Settings()


def _compose() -> dict[str, Any]:
    return yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())


def test_every_service_is_defined_with_postgres() -> None:
    assert set(_compose()["services"]) == SERVICES | {"postgres"}


def test_variables_are_real_settings_and_ports_match_defaults() -> None:
    known = {f"PARLEY_{f.name.upper()}" for f in fields(Settings)}
    for name, svc in _compose()["services"].items():
        if name == "postgres":
            continue
        env = svc["environment"]
        assert set(env) <= known, set(env) - known
        port = int(env[f"PARLEY_{name.upper()}_PORT"])
        assert port == getattr(DEFAULTS, f"{name}_port")
        published = {int(p.split(":")[1]) for p in svc["ports"]}
        assert port in published
        assert svc["healthcheck"]["test"][-1] == f"127.0.0.1:{port}"
        assert svc["command"] == ["python", "-m", f"services.{name}"]
        assert (svc["build"], svc["image"]) == (".", "parley:latest")  # one image for all four
        for http in ("ingest_http_port", "messaging_http_port"):
            if http.startswith(name):
                assert int(env[f"PARLEY_{http.upper()}"]) == getattr(DEFAULTS, http) in published


def test_peer_addresses_point_at_compose_services_on_their_ports() -> None:
    compose = _compose()
    for name, svc in compose["services"].items():
        if name == "postgres":
            continue
        env = svc["environment"]
        assert env["PARLEY_DATABASE_URL"].split("@")[1].startswith("postgres:5432/")
        for peer in SERVICES:
            host, port = env[f"PARLEY_{peer.upper()}_ADDR"].split(":")
            assert host == peer and int(port) == getattr(DEFAULTS, f"{peer}_port")
