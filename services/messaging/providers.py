"""SMS providers behind one small interface: Twilio's REST API, and a console provider for local runs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode

import aiohttp
import structlog

from services.common.logs import mask_phone
from services.common.settings import Settings

log = structlog.get_logger(__name__)

ACCEPTED, RETRY, FAILED = "accepted", "retry", "failed"


@dataclass(frozen=True)
class OutboundSms:
    message_id: str
    to: str
    body: str
    status_callback: str


@dataclass(frozen=True)
class SendResult:
    outcome: str  # ACCEPTED | RETRY | FAILED
    provider_message_id: str = ""
    error_code: str = ""
    error_message: str = ""
    # Seconds the provider asked us to wait (429 Retry-After).
    retry_after: float | None = None


class Provider(Protocol):
    name: str

    async def send(self, sms: OutboundSms) -> SendResult: ...

    async def close(self) -> None: ...


class ConsoleProvider:
    """Logs what would be sent (never the full number) and accepts everything."""

    name = "console"

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    async def send(self, sms: OutboundSms) -> SendResult:
        log.info("sms_console_send", to=mask_phone(sms.to), message_id=sms.message_id, body_chars=len(sms.body))
        return SendResult(ACCEPTED, provider_message_id=f"CONSOLE{sms.message_id.replace('-', '')}")

    async def close(self) -> None:
        return None


class TwilioProvider:
    """Twilio's Messages resource: a form-encoded POST per message, HTTP basic auth with the account SID.

    https://www.twilio.com/docs/messaging/api/message-resource#create-a-message-resource
    429 and 5xx and timeouts are retryable; any other 4xx is final and keeps Twilio's error code.
    """

    name = "twilio"

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        from_number: str,
        base_url: str = "https://api.twilio.com",
        *,
        timeout: float = 10.0,
        max_connections: int = 128,
    ) -> None:
        self.account_sid = account_sid
        self._headers = {
            "Authorization": aiohttp.encode_basic_auth(account_sid, auth_token),
            "Content-Type": "application/x-www-form-urlencoded",
        }
        self._from = from_number
        self._url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections), timeout=self._timeout
            )
        return self._session

    async def send(self, sms: OutboundSms) -> SendResult:
        form = {"To": sms.to, "Body": sms.body, "StatusCallback": sms.status_callback}
        if self._from.startswith("MG"):
            form["MessagingServiceSid"] = self._from
        else:
            form["From"] = self._from
        try:
            # Encoded here: the same body aiohttp's form machinery would make, at a third of the cost.
            body = urlencode(form).encode()
            async with self._client().post(self._url, data=body, headers=self._headers) as resp:
                payload = await _json(resp)
                if resp.status in (200, 201):
                    return SendResult(ACCEPTED, provider_message_id=str(payload.get("sid", "")))
                code = str(payload.get("code") or resp.status)
                message = str(payload.get("message") or resp.reason or "")
                if resp.status == 429 or resp.status >= 500:
                    return SendResult(RETRY, error_code=code, error_message=message, retry_after=_retry_after(resp))
                return SendResult(FAILED, error_code=code, error_message=message)
        except TimeoutError:
            return SendResult(RETRY, error_code="timeout", error_message="provider did not answer in time")
        except aiohttp.ClientError as exc:
            return SendResult(RETRY, error_code="network", error_message=type(exc).__name__)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _json(resp: aiohttp.ClientResponse) -> dict[str, object]:
    try:
        data = await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        return {}
    return data if isinstance(data, dict) else {}


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def build_provider(settings: Settings) -> Provider:
    """The provider ``PARLEY_SMS_PROVIDER`` names; "twilio" needs the account SID, token and sender."""
    kind = settings.sms_provider.strip().lower()
    if kind == "console":
        return ConsoleProvider()
    if kind == "twilio":
        missing = [
            name
            for name in ("twilio_account_sid", "twilio_auth_token", "twilio_from_number")
            if not getattr(settings, name)
        ]
        if missing:
            raise ValueError("PARLEY_SMS_PROVIDER=twilio needs " + ", ".join(f"PARLEY_{m.upper()}" for m in missing))
        return TwilioProvider(
            settings.twilio_account_sid or "",
            settings.twilio_auth_token or "",
            settings.twilio_from_number or "",
            settings.twilio_api_base_url,
        )
    raise ValueError(f"PARLEY_SMS_PROVIDER={settings.sms_provider!r}: expected 'console' or 'twilio'")
