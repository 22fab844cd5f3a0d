"""Numbers written as text: the one reading that campaign's conditions and identity's filter SQL share."""

from __future__ import annotations

import re

# A plain decimal number with optional sign, fraction and a short exponent, spaces around allowed:
# what both Python's float() and PostgreSQL's numeric read the same way. (No "inf", "nan",
# underscores or non-ASCII digits, which float() would take and numeric would not.)
NUMERIC_TEXT = re.compile(r"\s*[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]{1,3})?\s*")

# The same, anchored, as a PostgreSQL regular expression (`text ~ NUMERIC_TEXT_SQL`).
NUMERIC_TEXT_SQL = f"^(?:{NUMERIC_TEXT.pattern})$"

# A part of a dotted property path that PostgreSQL's `#>` reads as a list index when it meets a
# list (strtol: leading spaces, a sign; negative counts from the end).
LIST_INDEX = re.compile(r"\s*[-+]?[0-9]+")
