"""CampaignService over gRPC: proto in → definitions, repository, engine → proto out."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import grpc
from google.protobuf import timestamp_pb2
from parley.campaign.v1 import campaign_service_pb2 as pb
from parley.campaign.v1 import campaign_service_pb2_grpc as pb_grpc

from services.campaign import preview, repository
from services.campaign.definition import definition_from_stored, definition_to_dict, validate
from services.campaign.engine import Engine
from services.common.context import current_workspace
from services.common.errors import InvalidArgument, Violation

_STATES = {
    "draft": pb.CAMPAIGN_STATE_DRAFT,
    "live": pb.CAMPAIGN_STATE_LIVE,
    "paused": pb.CAMPAIGN_STATE_PAUSED,
    "archived": pb.CAMPAIGN_STATE_ARCHIVED,
}
_STATE_NAMES = {v: k for k, v in _STATES.items()}
_ENROLLMENT_STATES = {
    "active": pb.ENROLLMENT_STATE_ACTIVE,
    "completed": pb.ENROLLMENT_STATE_COMPLETED,
    "exited": pb.ENROLLMENT_STATE_EXITED,
}
DEFAULT_PAGE, MAX_PAGE = 100, 1000
MAX_NAME = 200


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def campaign_proto(row: asyncpg.Record) -> pb.Campaign:
    return pb.Campaign(
        id=str(row["id"]),
        name=row["name"],
        description=row["description"],
        state=_STATES[row["state"]],
        definition=definition_from_stored(row["draft"]),
        live_version=row["live_version"],
        create_time=_ts(row["create_time"]),
        update_time=_ts(row["update_time"]),
        publish_time=_ts(row["publish_time"]),
    )


def _page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(value or DEFAULT_PAGE, MAX_PAGE)


def _check_campaign_fields(c: pb.Campaign, prefix: str) -> None:
    problems: list[Violation] = []
    if not c.name.strip():
        problems.append(Violation(f"{prefix}.name", "required"))
    elif len(c.name) > MAX_NAME:
        problems.append(Violation(f"{prefix}.name", f"at most {MAX_NAME} characters"))
    try:
        validate(c.definition, f"{prefix}.definition", draft=True)
    except InvalidArgument as exc:
        problems.extend(exc.violations)
    if problems:
        raise InvalidArgument(problems)


class CampaignServicer(pb_grpc.CampaignServiceServicer):
    def __init__(self, pool: asyncpg.Pool, engine: Engine) -> None:
        self.pool = pool
        self.engine = engine

    async def CreateCampaign(self, request: pb.CreateCampaignRequest, context: grpc.aio.ServicerContext) -> Any:
        ws = current_workspace()
        _check_campaign_fields(request.campaign, "campaign")
        row = await repository.create_campaign(
            self.pool,
            ws.id,
            name=request.campaign.name.strip(),
            description=request.campaign.description,
            draft=definition_to_dict(request.campaign.definition),
            request_id=request.request_id,
        )
        return pb.CreateCampaignResponse(campaign=campaign_proto(row))

    async def UpdateCampaign(self, request: pb.UpdateCampaignRequest, context: grpc.aio.ServicerContext) -> Any:
        ws = current_workspace()
        if not request.campaign.id:
            raise InvalidArgument.field("campaign.id", "required")
        _check_campaign_fields(request.campaign, "campaign")
        row = await repository.update_campaign(
            self.pool,
            ws.id,
            request.campaign.id,
            name=request.campaign.name.strip(),
            description=request.campaign.description,
            draft=definition_to_dict(request.campaign.definition),
        )
        return pb.UpdateCampaignResponse(campaign=campaign_proto(row))

    async def PublishCampaign(self, request: pb.PublishCampaignRequest, context: grpc.aio.ServicerContext) -> Any:
        ws = current_workspace()
        current = await repository.get_campaign(self.pool, ws.id, _required(request.campaign_id, "campaign_id"))
        definition = definition_from_stored(current["draft"])
        validate(definition, "campaign.definition")
        row, version = await repository.publish(self.pool, ws.id, request.campaign_id, definition_to_dict(definition))
        self.engine.campaigns_changed()
        return pb.PublishCampaignResponse(campaign=campaign_proto(row), version=version)

    async def _state(self, campaign_id: str, allowed: Sequence[str], to: str) -> asyncpg.Record:
        ws = current_workspace()
        row = await repository.change_state(
            self.pool, ws.id, _required(campaign_id, "campaign_id"), allowed=allowed, to=to, now=self.engine.clock.now()
        )
        self.engine.campaigns_changed()
        return row

    async def PauseCampaign(self, request: pb.PauseCampaignRequest, context: grpc.aio.ServicerContext) -> Any:
        row = await self._state(request.campaign_id, ["live"], "paused")
        return pb.PauseCampaignResponse(campaign=campaign_proto(row))

    async def ResumeCampaign(self, request: pb.ResumeCampaignRequest, context: grpc.aio.ServicerContext) -> Any:
        row = await self._state(request.campaign_id, ["paused"], "live")
        self.engine.wake()
        return pb.ResumeCampaignResponse(campaign=campaign_proto(row))

    async def ArchiveCampaign(self, request: pb.ArchiveCampaignRequest, context: grpc.aio.ServicerContext) -> Any:
        row = await self._state(request.campaign_id, ["draft", "live", "paused"], "archived")
        return pb.ArchiveCampaignResponse(campaign=campaign_proto(row))

    async def GetCampaign(self, request: pb.GetCampaignRequest, context: grpc.aio.ServicerContext) -> Any:
        ws = current_workspace()
        row = await repository.get_campaign(self.pool, ws.id, _required(request.campaign_id, "campaign_id"))
        return pb.GetCampaignResponse(campaign=campaign_proto(row))

    async def ListCampaigns(self, request: pb.ListCampaignsRequest, context: grpc.aio.ServicerContext) -> Any:
        ws = current_workspace()
        if request.state and request.state not in _STATE_NAMES:
            raise InvalidArgument.field("state", "unknown state")
        rows, token = await repository.list_campaigns(
            self.pool,
            ws.id,
            name=request.name,
            state=_STATE_NAMES.get(request.state, ""),
            page_size=_page_size(request.page_size),
            page_token=request.page_token,
        )
        return pb.ListCampaignsResponse(campaigns=[campaign_proto(r) for r in rows], next_page_token=token)

    async def ListEnrollments(self, request: pb.ListEnrollmentsRequest, context: grpc.aio.ServicerContext) -> Any:
        ws = current_workspace()
        if not request.campaign_id and not request.contact_id:
            raise InvalidArgument([Violation("campaign_id", "campaign_id or contact_id is required")])
        rows, history, token = await repository.list_enrollments(
            self.pool,
            ws.id,
            campaign_id=request.campaign_id,
            contact_id=request.contact_id,
            page_size=_page_size(request.page_size),
            page_token=request.page_token,
        )
        visits: dict[Any, list[pb.StepVisit]] = {}
        for h in history:
            visits.setdefault(h["enrollment_id"], []).append(
                pb.StepVisit(
                    step_id=h["step_id"],
                    visit=h["visit"],
                    kind=h["kind"],
                    enter_time=_ts(h["enter_time"]),
                    end_time=_ts(h["end_time"]),
                    outcome=h["outcome"],
                    detail=h["detail"],
                    message_id=h["message_id"],
                    task_id=h["task_id"],
                )
            )
        out = [
            pb.Enrollment(
                id=str(r["id"]),
                campaign_id=str(r["campaign_id"]),
                version=r["version"],
                contact_id=r["contact_id"],
                state=_ENROLLMENT_STATES[r["state"]],
                current_step_id=r["step_id"] if r["state"] == "active" else "",
                due_time=_ts(r["due_at"]) if r["state"] == "active" else None,
                enroll_time=_ts(r["enroll_time"]),
                end_time=_ts(r["end_time"]),
                exit_reason=r["exit_reason"],
                conversion_time=_ts(r["conversion_time"]),
                cohorts=r["cohorts"],
                history=visits.get(r["id"], []),
                trigger_message_id=r["trigger_event"].get("message_id", ""),
            )
            for r in rows
        ]
        return pb.ListEnrollmentsResponse(enrollments=out, next_page_token=token)

    async def GetCampaignStats(self, request: pb.GetCampaignStatsRequest, context: grpc.aio.ServicerContext) -> Any:
        ws = current_workspace()
        campaign = await repository.get_campaign(self.pool, ws.id, _required(request.campaign_id, "campaign_id"))
        data = await repository.stats(self.pool, ws.id, campaign["id"])
        versions: dict[int, pb.VersionStats] = {}
        for v in range(1, campaign["live_version"] + 1):
            versions[v] = pb.VersionStats(version=v)
        total = pb.VersionStats()
        for r in data["versions"]:
            vs = versions.setdefault(r["version"], pb.VersionStats(version=r["version"]))
            for f in ("entered", "active", "completed", "exited_early", "converted"):
                setattr(vs, f, r[f])
                setattr(total, f, getattr(total, f) + r[f])
            vs.conversion_rate = vs.converted / vs.entered if vs.entered else 0.0
        total.conversion_rate = total.converted / total.entered if total.entered else 0.0
        for r in data["steps"]:
            vs = versions.setdefault(r["version"], pb.VersionStats(version=r["version"]))
            vs.steps.append(
                pb.StepStats(
                    **{
                        k: r[k]
                        for k in (
                            "step_id",
                            "kind",
                            "entered",
                            "waiting",
                            "completed",
                            "messages_sent",
                            "messages_delivered",
                            "messages_failed",
                            "tasks_created",
                            "tasks_completed",
                        )
                    }
                )
            )
        for r in data["cohorts"]:
            vs = versions.setdefault(r["version"], pb.VersionStats(version=r["version"]))
            vs.cohorts.append(
                pb.CohortStats(
                    step_id=r["step_id"],
                    cohort=r["cohort"],
                    entered=r["entered"],
                    converted=r["converted"],
                    conversion_rate=r["converted"] / r["entered"] if r["entered"] else 0.0,
                )
            )
        return pb.GetCampaignStatsResponse(
            campaign_id=str(campaign["id"]), versions=[versions[k] for k in sorted(versions)], total=total
        )

    async def PreviewCampaign(self, request: pb.PreviewCampaignRequest, context: grpc.aio.ServicerContext) -> Any:
        ws = current_workspace()
        if request.HasField("definition"):
            definition = request.definition
            validate(definition, "definition")
        elif request.campaign_id:
            row = await repository.get_campaign(self.pool, ws.id, request.campaign_id)
            definition = definition_from_stored(row["draft"])
            validate(definition, "campaign.definition")
        else:
            raise InvalidArgument.field("definition", "campaign_id or definition is required")
        if not request.contact_id and not request.phone:
            raise InvalidArgument.field("contact_id", "contact_id or phone is required")
        return await preview.run(self.engine, ws.id, definition, request)


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument.field(field, "required")
    return value
