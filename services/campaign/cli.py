"""``parley campaigns apply FILE...``: create or update campaigns from YAML files and publish them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import grpc
import yaml
from parley.campaign.v1 import campaign_service_pb2 as pb
from parley.campaign.v1 import campaign_service_pb2_grpc as pb_grpc

from services.campaign.definition import from_dict, validate
from services.common.clients import channel, key_metadata
from services.common.errors import InvalidArgument, violations_of
from services.common.settings import load_settings


def register(subparsers: Any) -> None:
    """Add the ``campaigns`` command to the ``parley`` CLI."""
    campaigns = subparsers.add_parser("campaigns", help="manage campaigns (journeys) from YAML files")
    actions = campaigns.add_subparsers(dest="action", required=True)
    apply = actions.add_parser("apply", help="create or update each file's campaign by name, then publish it")
    apply.add_argument("files", nargs="+", metavar="FILE")
    apply.add_argument("--addr", default=None, help="campaign service address (default: settings.campaign_addr)")
    apply.add_argument("--key", default=None, help="workspace API key (default: $PARLEY_API_KEY)")
    apply.add_argument("--draft", action="store_true", help="save the draft without publishing")
    apply.set_defaults(func=_apply)
    check = actions.add_parser("validate", help="check files offline; exit 1 on the first invalid one")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(func=_validate)


def load_file(path: str) -> list[pb.Campaign]:
    """The campaigns of a YAML (or JSON) file: one per document, ``name``/``description``/``definition``."""
    out: list[pb.Campaign] = []
    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise InvalidArgument.field(f"[{i}]", "a campaign document must be a mapping")
        campaign = pb.Campaign()
        from_dict({k: v for k, v in doc.items() if k in ("name", "description", "definition")}, campaign, "")
        extra = set(doc) - {"name", "description", "definition"}
        if extra:
            raise InvalidArgument.field(sorted(extra)[0], "unknown field (known: name, description, definition)")
        if not campaign.name:
            raise InvalidArgument.field("name", "required")
        validate(campaign.definition, "definition")
        out.append(campaign)
    return out


def _print_violations(path: str, exc: InvalidArgument) -> None:
    for v in exc.violations or []:
        print(f"{path}: {v.field}: {v.description}", file=sys.stderr)
    if not exc.violations:
        print(f"{path}: {exc.message}", file=sys.stderr)


def _validate(args: argparse.Namespace) -> int:
    for path in args.files:
        try:
            campaigns = load_file(path)
        except InvalidArgument as exc:
            _print_violations(path, exc)
            return 1
        for c in campaigns:
            print(f"{path}: {c.name}: ok ({len(c.definition.steps)} steps)")
    return 0


async def _apply(args: argparse.Namespace) -> int:
    key = args.key or os.environ.get("PARLEY_API_KEY")
    if not key:
        print("error: an API key is needed (--key or PARLEY_API_KEY)", file=sys.stderr)
        return 2
    loaded: list[tuple[str, pb.Campaign]] = []
    for path in args.files:
        try:
            loaded += [(path, c) for c in load_file(path)]
        except InvalidArgument as exc:
            _print_violations(path, exc)
            return 1
        except OSError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 1
    addr = args.addr or load_settings().campaign_addr
    md = key_metadata(key)
    # Without retries: creating a campaign by name is not keyed by a request id here.
    async with channel(addr, retry=False) as ch:
        stub = pb_grpc.CampaignServiceStub(ch)
        for path, campaign in loaded:
            try:
                line = await apply_one(stub, md, campaign, publish=not args.draft)
            except grpc.aio.AioRpcError as err:
                print(f"{path}: {campaign.name}: {err.code().name}: {err.details()}", file=sys.stderr)
                for v in violations_of(err):
                    print(f"{path}:   {v.field}: {v.description}", file=sys.stderr)
                return 1
            print(f"{Path(path).name}: {line}")
    return 0


async def apply_one(
    stub: pb_grpc.CampaignServiceStub, md: tuple[tuple[str, str], ...], campaign: pb.Campaign, *, publish: bool
) -> str:
    """Create or update ``campaign`` by name, then publish it; returns a one-line summary."""
    found = await stub.ListCampaigns(pb.ListCampaignsRequest(name=campaign.name, page_size=1), metadata=md)
    if found.campaigns:
        campaign.id = found.campaigns[0].id
        saved = (await stub.UpdateCampaign(pb.UpdateCampaignRequest(campaign=campaign), metadata=md)).campaign
        verb = "updated"
    else:
        saved = (await stub.CreateCampaign(pb.CreateCampaignRequest(campaign=campaign), metadata=md)).campaign
        verb = "created"
    if not publish:
        return f"{saved.name} {verb} (draft)"
    done = await stub.PublishCampaign(pb.PublishCampaignRequest(campaign_id=saved.id), metadata=md)
    return f"{saved.name} {verb}, published version {done.version} (id {saved.id})"
