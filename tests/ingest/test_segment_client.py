"""The real segment-analytics-python client against Parley's HTTP ingest, read back through identity."""

from __future__ import annotations

import asyncio
import uuid

from parley.common.v1.event_pb2 import EventType
from parley.identity.v1 import identity_service_pb2 as ipb
from segment.analytics import Client

from tests.ingest.conftest import Stack, StackFactory


def client(stack: Stack, errors: list[Exception]) -> Client:
    return Client(
        write_key=stack.key,
        host=stack.http_url,
        gzip=True,
        upload_interval=0.05,
        on_error=lambda exc, _batch: errors.append(exc),
    )


async def test_sdk_identify_track_page_make_a_contact_with_a_timeline(stack: Stack) -> None:
    errors: list[Exception] = []
    sdk = client(stack, errors)
    user = f"sdk-{uuid.uuid4().hex[:8]}"
    sdk.identify(user, {"phone": "(415) 555-0177", "first_name": "Lin"})
    sdk.track(user, "Loan Approved", {"amount": 12000})
    sdk.page(user, "Docs", "Getting Started", {"path": "/docs"})
    sdk.track(anonymous_id=f"anon-{user}", event="Anonymous Browse")
    await asyncio.to_thread(sdk.shutdown)
    assert errors == []

    found = await stack.identity_stub.GetContact(ipb.GetContactRequest(phone="+14155550177"), metadata=stack.md)
    contact = found.contact
    assert contact.phone == "+14155550177" and user in contact.user_ids
    timeline = await stack.identity_stub.ListContactEvents(
        ipb.ListContactEventsRequest(contact_id=contact.id), metadata=stack.md
    )
    kinds = sorted((EventType.Name(e.event.type), e.event.name) for e in timeline.events)
    assert kinds == [
        ("EVENT_TYPE_IDENTIFY", ""),
        ("EVENT_TYPE_PAGE", "Getting Started"),
        ("EVENT_TYPE_TRACK", "Loan Approved"),
    ]
    page = next(e.event for e in timeline.events if e.event.type == EventType.EVENT_TYPE_PAGE)
    assert page.properties.fields["category"].string_value == "Docs"
    assert page.context.fields["library"].struct_value.fields["name"].string_value == "analytics-python"


async def test_sdk_retries_through_an_identity_outage_without_duplicates(make_stack: StackFactory) -> None:
    stack = await make_stack()
    errors: list[Exception] = []
    sdk = client(stack, errors)
    user = f"sdk-{uuid.uuid4().hex[:8]}"
    responses = stack.ingest.runtime.state["http_responses"]
    await stack.identity.stop(0)
    for i in range(5):
        sdk.track(user, f"Event {i}", message_id=f"{user}-{i}")
    flushed = asyncio.create_task(asyncio.to_thread(sdk.shutdown))
    for _ in range(200):
        if responses[503]:
            break
        await asyncio.sleep(0.05)
    await stack.restart_identity()
    await flushed
    assert responses[503] >= 1, "the SDK never met the outage"
    assert responses[200] >= 1
    assert errors == []
    got = await stack.identity_stub.GetUser(ipb.GetUserRequest(user_id=user, event_limit=100), metadata=stack.md)
    assert sorted(e.event.message_id for e in got.events) == [f"{user}-{i}" for i in range(5)]
