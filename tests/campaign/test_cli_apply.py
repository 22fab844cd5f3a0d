"""`parley campaigns apply examples/*.yaml` creates, then updates and republishes, by name."""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import pytest
from parley.campaign.v1 import campaign_service_pb2 as pb

from services.campaign import cli
from services.common.settings import PROJECT_ROOT
from tests.campaign.conftest import Campaigns

EXAMPLES = sorted(glob.glob(str(PROJECT_ROOT / "examples" / "*.yaml")))


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["campaigns", *argv])


async def test_apply_examples_twice(campaigns_only: Campaigns, capsys: pytest.CaptureFixture[str]) -> None:
    c = campaigns_only
    key = c.md[0][1].removeprefix("Bearer ")
    addr = f"127.0.0.1:{c.server.port}"
    assert len(EXAMPLES) >= 3
    assert await cli._apply(_args("apply", *EXAMPLES, "--addr", addr, "--key", key)) == 0
    assert await cli._apply(_args("apply", *EXAMPLES, "--addr", addr, "--key", key)) == 0
    out = capsys.readouterr().out
    assert out.count("created") == len(EXAMPLES) and out.count("published version 2") == len(EXAMPLES)
    listed = await c.stub.ListCampaigns(pb.ListCampaignsRequest(name="Lead speed-to-call"), metadata=c.md)
    assert listed.campaigns[0].live_version == 2 and listed.campaigns[0].state == pb.CAMPAIGN_STATE_LIVE


async def test_bad_file_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: broken\ndefinition:\n  trigger: {event: {name: X}}\n"
        "  steps:\n    - id: a\n      wait: {duration: soon}\n      next: b\n"
    )
    assert cli._validate(_args("validate", str(bad))) == 1
    err = capsys.readouterr().err
    assert "definition.steps[0].wait.duration" in err and "definition.steps[0].next" in err
    assert await cli._apply(_args("apply", str(bad), "--addr", "127.0.0.1:1", "--key", "k")) == 1
