"""Numbers written as text: the one reading that campaign's conditions and identity's filter SQL share."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# ASCII whitespace only: Python's and PostgreSQL's \s also take other control and Unicode spaces,
# which neither float()/Decimal nor numeric accept around a number.
_SPACE = r"[ \t\n\r\f\v]*"

# A plain decimal number with optional sign, fraction and a short exponent, spaces around allowed:
# what Python's Decimal and PostgreSQL's numeric read the same way. (No "inf", "nan", underscores
# or non-ASCII digits; at most 255 digits on each side of the point, within what numeric holds
# and what PostgreSQL's regular expressions can count.)
NUMERIC_TEXT = re.compile(
    _SPACE + r"[-+]?([0-9]{1,255}(\.[0-9]{0,255})?|\.[0-9]{1,255})([eE][-+]?[0-9]{1,3})?" + _SPACE
)

# The same, anchored, as a PostgreSQL regular expression (`text ~ NUMERIC_TEXT_SQL`).
NUMERIC_TEXT_SQL = f"^(?:{NUMERIC_TEXT.pattern})$"

# A part of a dotted property path that PostgreSQL's `#>` reads as a list index when it meets a
# list (strtol: leading spaces, a sign; negative counts from the end).
LIST_INDEX = re.compile(_SPACE + r"[-+]?[0-9]+")


def numeric_value(text: str) -> Decimal | None:
    """``text`` as an exact number when it is ``NUMERIC_TEXT``, else None."""
    if NUMERIC_TEXT.fullmatch(text) is None:
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # not expected for text the pattern admits; never raise on data
        return None
