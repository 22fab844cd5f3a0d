"""Logs never carry a raw phone number."""

from __future__ import annotations

from services.common.logs import mask_phone, mask_phones


def test_phones_in_any_format_are_masked() -> None:
    for raw in ["+14155552671", "(415) 555-2671", "+1 415-555-2671", "4155552671"]:
        masked = mask_phone(f"sending to {raw} now")
        assert "555" not in masked and masked.endswith("***2671 now")


def test_short_numbers_and_ids_are_kept() -> None:
    assert mask_phone("retry 3 of 5, status 429") == "retry 3 of 5, status 429"
    assert mask_phone("order_12345678") == "order_12345678"


def test_processor_masks_nested_values() -> None:
    event = mask_phones(None, "info", {"event": "sms", "to": "+14155552671", "ctx": {"from": ["+442071838750"]}})
    assert event == {"event": "sms", "to": "***2671", "ctx": {"from": ["***8750"]}}
