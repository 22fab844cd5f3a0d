"""Create, update, publish (versions), pause, resume, archive, list — and INVALID_ARGUMENT paths over gRPC."""

from __future__ import annotations

import base64

import grpc
import pytest
from parley.campaign.v1 import campaign_service_pb2 as pb

from services.common.errors import field_violations
from tests.campaign.conftest import Campaigns, definition

SIMPLE = {
    "trigger": {"event": {"name": "Signed Up"}},
    "steps": [{"id": "hello", "send_sms": {"body": 'Welcome {{contact.first_name|default:"friend"}}'}}],
}


async def test_create_update_publish_versions(campaigns_only: Campaigns) -> None:
    c, md = campaigns_only, campaigns_only.md
    created = (
        await c.stub.CreateCampaign(
            pb.CreateCampaignRequest(
                request_id="r1", campaign=pb.Campaign(name="welcome", definition=definition(SIMPLE))
            ),
            metadata=md,
        )
    ).campaign
    assert created.state == pb.CAMPAIGN_STATE_DRAFT and created.live_version == 0
    again = (
        await c.stub.CreateCampaign(
            pb.CreateCampaignRequest(
                request_id="r1", campaign=pb.Campaign(name="welcome", definition=definition(SIMPLE))
            ),
            metadata=md,
        )
    ).campaign
    assert again.id == created.id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.stub.CreateCampaign(pb.CreateCampaignRequest(campaign=pb.Campaign(name="welcome")), metadata=md)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    v1 = await c.stub.PublishCampaign(pb.PublishCampaignRequest(campaign_id=created.id), metadata=md)
    assert v1.version == 1 and v1.campaign.state == pb.CAMPAIGN_STATE_LIVE
    changed = pb.Campaign(id=created.id, name="welcome", definition=definition(SIMPLE))
    changed.definition.steps[0].send_sms.body = "Hello again"
    await c.stub.UpdateCampaign(pb.UpdateCampaignRequest(campaign=changed), metadata=md)
    v2 = await c.stub.PublishCampaign(pb.PublishCampaignRequest(campaign_id=created.id), metadata=md)
    assert v2.version == 2
    got = (await c.stub.GetCampaign(pb.GetCampaignRequest(campaign_id=created.id), metadata=md)).campaign
    assert got.definition.steps[0].send_sms.body == "Hello again" and got.live_version == 2

    paused = await c.stub.PauseCampaign(pb.PauseCampaignRequest(campaign_id=created.id), metadata=md)
    assert paused.campaign.state == pb.CAMPAIGN_STATE_PAUSED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.stub.PauseCampaign(pb.PauseCampaignRequest(campaign_id=created.id), metadata=md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    resumed = await c.stub.ResumeCampaign(pb.ResumeCampaignRequest(campaign_id=created.id), metadata=md)
    assert resumed.campaign.state == pb.CAMPAIGN_STATE_LIVE
    listed = await c.stub.ListCampaigns(pb.ListCampaignsRequest(name="welcome"), metadata=md)
    assert [x.id for x in listed.campaigns] == [created.id]
    archived = await c.stub.ArchiveCampaign(pb.ArchiveCampaignRequest(campaign_id=created.id), metadata=md)
    assert archived.campaign.state == pb.CAMPAIGN_STATE_ARCHIVED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.stub.PublishCampaign(pb.PublishCampaignRequest(campaign_id=created.id), metadata=md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_list_pagination(campaigns_only: Campaigns) -> None:
    c = campaigns_only
    for i in range(5):
        await c.stub.CreateCampaign(pb.CreateCampaignRequest(campaign=pb.Campaign(name=f"page-{i}")), metadata=c.md)
    seen, token = [], ""
    while True:
        resp = await c.stub.ListCampaigns(pb.ListCampaignsRequest(page_size=2, page_token=token), metadata=c.md)
        seen += [x.name for x in resp.campaigns]
        token = resp.next_page_token
        if not token:
            break
    assert {f"page-{i}" for i in range(5)} <= set(seen) and len(seen) == len(set(seen))


async def _violations(call: object) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return {v.field: v.description for v in await field_violations(err.value)}


async def test_bad_input_names_fields(campaigns_only: Campaigns) -> None:
    c, md = campaigns_only, campaigns_only.md
    bad = definition(SIMPLE)
    bad.steps[0].send_sms.body = ""
    bad.steps[0].next = "missing"
    found = await _violations(
        c.stub.CreateCampaign(pb.CreateCampaignRequest(campaign=pb.Campaign(name="bad", definition=bad)), metadata=md)
    )
    assert "campaign.definition.steps[0].send_sms.body" in found
    assert "campaign.definition.steps[0].next" in found
    found = await _violations(c.stub.CreateCampaign(pb.CreateCampaignRequest(campaign=pb.Campaign()), metadata=md))
    assert "campaign.name" in found
    found = await _violations(c.stub.GetCampaign(pb.GetCampaignRequest(campaign_id="nope"), metadata=md))
    assert "campaign_id" in found
    found = await _violations(c.stub.ListEnrollments(pb.ListEnrollmentsRequest(), metadata=md))
    assert "campaign_id" in found
    found = await _violations(c.stub.ListCampaigns(pb.ListCampaignsRequest(page_token="zzz"), metadata=md))
    assert "page_token" in found
    too_deep = base64.urlsafe_b64encode(b"[" * 3000).decode()  # past the JSON parser's depth
    found = await _violations(c.stub.ListCampaigns(pb.ListCampaignsRequest(page_token=too_deep), metadata=md))
    assert "page_token" in found
    draft = await c.stub.CreateCampaign(pb.CreateCampaignRequest(campaign=pb.Campaign(name="empty")), metadata=md)
    found = await _violations(
        c.stub.PublishCampaign(pb.PublishCampaignRequest(campaign_id=draft.campaign.id), metadata=md)
    )
    assert "campaign.definition.trigger" in found and "campaign.definition.steps" in found
    found = await _violations(c.stub.PreviewCampaign(pb.PreviewCampaignRequest(), metadata=md))
    assert "definition" in found


async def test_unknown_campaign_is_not_found(campaigns_only: Campaigns) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await campaigns_only.stub.GetCampaign(
            pb.GetCampaignRequest(campaign_id="00000000-0000-0000-0000-000000000000"), metadata=campaigns_only.md
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
