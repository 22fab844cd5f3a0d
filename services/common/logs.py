"""structlog configuration: JSON lines in production, phones masked in every field."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# E.164 or loosely formatted numbers of 7+ digits; the last 4 digits stay visible for support.
_PHONE = re.compile(r"(?<![\w])(\+?\d[\d\s().-]{5,}\d)(?![\w])")


def mask_phone(text: str) -> str:
    """Replace every phone-like number in ``text`` with ``***1234``."""

    def repl(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group(1))
        if len(digits) < 7:
            return match.group(1)
        return "***" + digits[-4:]

    return _PHONE.sub(repl, text)


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return mask_phone(value)
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


def mask_phones(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: no raw phone number reaches a log line."""
    for key, value in list(event_dict.items()):
        if key in {"timestamp", "level", "duration_ms", "request_id"}:
            continue
        event_dict[key] = _mask(value)
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """structlog's production recipe; a console renderer only on a TTY (or when asked)."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            mask_phones,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
