"""Keywords match the whole reply (case, spaces and punctuation aside); other words can still opt out."""

from __future__ import annotations

import pytest

from services.messaging.keywords import Intent, classify, normalize_reply


@pytest.mark.parametrize(
    ("body", "intent"),
    [
        ("STOP", Intent.OPT_OUT),
        ("stop", Intent.OPT_OUT),
        ("  Stop.  ", Intent.OPT_OUT),
        ("STOP!!!", Intent.OPT_OUT),
        ('"stop"', Intent.OPT_OUT),
        ("unsubscribe", Intent.OPT_OUT),
        ("Cancel", Intent.OPT_OUT),
        ("end", Intent.OPT_OUT),
        ("quit", Intent.OPT_OUT),
        ("STOPALL", Intent.OPT_OUT_ALL),
        ("start", Intent.OPT_IN),
        ("Yes", Intent.OPT_IN),
        ("unstop", Intent.OPT_IN),
        ("help", Intent.HELP),
        ("INFO?", Intent.HELP),
        ("please stop texting me", Intent.OPT_OUT_PHRASE),
        ("Opt me out", Intent.OPT_OUT_PHRASE),
        ("I revoke my consent", Intent.OPT_OUT_PHRASE),
        ("don't text me again", Intent.OPT_OUT_PHRASE),
        ("Don\u2019t message me", Intent.OPT_OUT_PHRASE),
        ("no more texts please", Intent.OPT_OUT_PHRASE),
        ("remove me from your list", Intent.OPT_OUT_PHRASE),
        ("Stop it", Intent.OPT_OUT_PHRASE),
        # Never a substring test:
        ("STOPPED", Intent.NONE),
        ("I can't stop smiling", Intent.NONE),
        ("yes please, what time?", Intent.NONE),
        ("the weekend is near", Intent.NONE),
        ("helpful, thanks", Intent.NONE),
        ("Thanks! See you tomorrow", Intent.NONE),
        ("", Intent.NONE),
    ],
)
def test_classify(body: str, intent: Intent) -> None:
    assert classify(body) is intent


def test_normalize_strips_edges_only() -> None:
    assert normalize_reply("  ¡Stop!  ") == "STOP"
    assert normalize_reply("st op") == "ST OP"
