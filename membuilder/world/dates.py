"""Relative date expressions of the world's dialogues, and their resolution against the session date.

The conventions (fixed, so a reader can resolve every expression exactly):
- "today", "this morning": the session date; "yesterday": 1 day before; "N days ago": N days
  before (N written as a word); "a week ago" 7, "two weeks ago" 14 days before;
- "last <weekday>": the most recent such weekday strictly before the session date (1 to 7 days);
- "tomorrow", "the day after tomorrow": 1 and 2 days after; "in N days", "in a week",
  "in two weeks": that many days after;
- "this coming <weekday>": the first such weekday strictly after the session date (1 to 7 days).
"""

from __future__ import annotations

import random
import re
from datetime import date, timedelta

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "ten": 10}
_FIXED = {"today": 0, "this morning": 0, "yesterday": -1, "a week ago": -7, "two weeks ago": -14,
          "tomorrow": 1, "the day after tomorrow": 2, "in a week": 7, "in two weeks": 14}


def resolve_relative(expression: str, session_date: date) -> date:
    """The date `expression` names when said on `session_date` (module doc); ValueError if unknown."""
    expr = expression.strip().lower()
    if expr in _FIXED:
        return session_date + timedelta(days=_FIXED[expr])
    m = re.fullmatch(r"(\w+) days ago", expr)
    if m and m.group(1) in _NUMBERS:
        return session_date - timedelta(days=_NUMBERS[m.group(1)])
    m = re.fullmatch(r"in (\w+) days", expr)
    if m and m.group(1) in _NUMBERS:
        return session_date + timedelta(days=_NUMBERS[m.group(1)])
    m = re.fullmatch(r"last (\w+)", expr)
    if m and m.group(1).capitalize() in WEEKDAYS:
        back = (session_date.weekday() - WEEKDAYS.index(m.group(1).capitalize())) % 7 or 7
        return session_date - timedelta(days=back)
    m = re.fullmatch(r"this coming (\w+)", expr)
    if m and m.group(1).capitalize() in WEEKDAYS:
        ahead = (WEEKDAYS.index(m.group(1).capitalize()) - session_date.weekday()) % 7 or 7
        return session_date + timedelta(days=ahead)
    raise ValueError(f"unknown relative date expression {expression!r}")


def past_expression(rng: random.Random) -> str:
    """A past-time expression (0 to 14 days back) chosen with `rng`."""
    choice = rng.randrange(6)
    if choice == 0:
        return rng.choice(("yesterday", "this morning", "yesterday"))
    if choice == 1:
        return f"{rng.choice(('two', 'three', 'four', 'five'))} days ago"
    if choice == 2:
        return rng.choice(("a week ago", "two weeks ago", "ten days ago"))
    return f"last {rng.choice(WEEKDAYS)}"


def future_expression(rng: random.Random) -> str:
    """A future-time expression (1 to 14 days ahead)."""
    choice = rng.randrange(4)
    if choice == 0:
        return rng.choice(("tomorrow", "the day after tomorrow"))
    if choice == 1:
        return rng.choice(("in three days", "in five days", "in a week", "in two weeks", "in ten days"))
    return f"this coming {rng.choice(WEEKDAYS)}"


def date_text(d: date) -> str:
    """'14 March 2023': the form of dates in memory texts and gold answers."""
    return f"{d.day} {d.strftime('%B')} {d.year}"


def session_date_text(moment) -> str:
    """LoCoMo's form, '7:30 pm on 14 March, 2023' (parsed by `parse_locomo_datetime`)."""
    hour = moment.hour % 12 or 12
    half = "pm" if moment.hour >= 12 else "am"
    return f"{hour}:{moment.minute:02d} {half} on {moment.day} {moment.strftime('%B')}, {moment.year}"
