"""Inbound keyword handling: exact keywords on the whole reply, and opt-out intent in other words."""

from __future__ import annotations

import enum
import re
import unicodedata


class Intent(enum.Enum):
    OPT_OUT = "opt_out"
    OPT_OUT_ALL = "opt_out_all"  # STOPALL: texts and calls
    OPT_IN = "opt_in"
    HELP = "help"
    OPT_OUT_PHRASE = "opt_out_phrase"  # asked to stop in other words; flagged for review
    NONE = "none"


OPT_OUT_KEYWORDS = frozenset({"STOP", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_OUT_ALL_KEYWORDS = frozenset({"STOPALL"})
OPT_IN_KEYWORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_KEYWORDS = frozenset({"HELP", "INFO"})

# Revocation "by any reasonable means" (FCC 2024 TCPA order, 47 CFR 64.1200(a)(10)):
# phrases matched on word boundaries, never as bare substrings.
_OPT_OUT_PHRASES = [
    r"\bstop\s+(?:texting|messaging|sending|contacting|calling|emailing|txting|msging)\b",
    r"\bstop\s+(?:it|this|these|that|all|now|please|pls|plz)\b",
    r"\b(?:please|pls|plz)\s+stop\b",
    r"\bopt\s*[- ]?\s*(?:me\s+)?out\b",
    r"\bunsubscribe\b",
    r"\bremove\s+(?:me|my\s+(?:number|name|phone))\b",
    r"\btake\s+me\s+off\b",
    r"\b(?:do\s+not|don'?t|dont|never)\s+(?:text|message|contact|call|txt|msg|sms)\b",
    r"\bno\s+more\s+(?:texts?|messages?|msgs?|sms|calls?)\b",
    r"\brevoke\b",
    r"\bleave\s+me\s+alone\b",
    r"\bwrong\s+number\b",
    r"\bcancel\s+(?:my\s+)?(?:subscription|texts?|messages?|sms)\b",
    r"\bend\s+(?:texts?|messages?|sms)\b",
    r"\bquit\s+(?:texting|messaging)\b",
]
_OPT_OUT_RE = re.compile("|".join(_OPT_OUT_PHRASES), re.IGNORECASE)


def normalize_reply(body: str) -> str:
    """Upper-case the reply without the spaces and punctuation around it (and quotes/emoji)."""
    text = unicodedata.normalize("NFKC", body).strip()

    def edge(ch: str) -> bool:
        cat = unicodedata.category(ch)
        return ch.isspace() or cat.startswith("P") or cat.startswith("S") or cat in {"Cf", "Zs"}

    start, end = 0, len(text)
    while start < end and edge(text[start]):
        start += 1
    while end > start and edge(text[end - 1]):
        end -= 1
    return text[start:end].upper()


def classify(body: str) -> Intent:
    """What a reply asks for. Keywords match the whole reply only ("STOPPED" is not STOP)."""
    word = normalize_reply(body)
    if word in OPT_OUT_ALL_KEYWORDS:
        return Intent.OPT_OUT_ALL
    if word in OPT_OUT_KEYWORDS:
        return Intent.OPT_OUT
    if word in OPT_IN_KEYWORDS:
        return Intent.OPT_IN
    if word in HELP_KEYWORDS:
        return Intent.HELP
    if _OPT_OUT_RE.search(unicodedata.normalize("NFKC", body).replace("\u2019", "'")):
        return Intent.OPT_OUT_PHRASE
    return Intent.NONE
