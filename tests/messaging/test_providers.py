"""Provider choice by settings; the console provider logs what it would send without the number."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from services.common.settings import Settings
from services.messaging.dispatcher import backoff_delay
from services.messaging.providers import ACCEPTED, ConsoleProvider, OutboundSms, TwilioProvider, build_provider


async def test_console_provider_accepts_and_masks_the_number() -> None:
    provider = build_provider(Settings())
    assert isinstance(provider, ConsoleProvider)
    with capture_logs() as logs:
        result = await provider.send(OutboundSms("m-1", "+12125550199", "hello", "https://x/cb"))
    assert result.outcome == ACCEPTED and result.provider_message_id
    assert "+12125550199" not in repr(logs) and "***0199" in repr(logs)


def test_twilio_needs_its_credentials() -> None:
    with pytest.raises(ValueError, match="PARLEY_TWILIO_ACCOUNT_SID"):
        build_provider(Settings(sms_provider="twilio"))
    ok = Settings(
        sms_provider="twilio", twilio_account_sid="AC1", twilio_auth_token="t", twilio_from_number="+15005550006"
    )
    assert isinstance(build_provider(ok), TwilioProvider)
    with pytest.raises(ValueError, match="PARLEY_SMS_PROVIDER"):
        build_provider(Settings(sms_provider="carrier-pigeon"))


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    delays = [backoff_delay(a, 1.0, 300.0) for a in range(1, 8)]
    for attempt, d in enumerate(delays, start=1):
        ceiling = min(300.0, 2 ** (attempt - 1))
        assert ceiling / 2 <= d <= ceiling
    assert backoff_delay(1, 1.0, 300.0, retry_after=30.0) == 30.0
    assert backoff_delay(20, 1.0, 300.0) <= 300.0
