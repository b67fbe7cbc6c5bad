"""Durations and instants as operators type them: `90d`, `12h`, `2026-01-31`, `7d` (ago)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# One or more number+unit pairs: "90d", "1h30m", "45s".
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?[smhdw])+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
# Ages beyond this reach back before year 1 (or overflow); nothing archived is that old.
_LONGEST = timedelta(days=365 * 1000)


def parse_duration(value: str) -> timedelta:
    """`90d`, `12h`, `1h30m`, `2w`, `45s`; a positive duration or ValueError."""
    spec = value.strip().lower()
    if not _DURATION.match(spec):
        raise ValueError(f"not a duration: {value!r} (expected e.g. 90d, 12h, 30m, 1h30m)")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(spec))
    if seconds <= 0:
        raise ValueError(f"duration must be positive: {value!r}")
    if seconds > _LONGEST.total_seconds():
        raise ValueError(f"duration too long: {value!r} (at most {_LONGEST.days} days)")
    return timedelta(seconds=seconds)


def iso_instant(text: str) -> datetime | None:
    """An ISO 8601 date or date-time, in UTC (taken as UTC without an offset); None when it is
    not one, or lies outside years 1 to 9999 once in UTC ("0001-01-01T00:00+05:00" does), where
    PostgreSQL and Python cannot both hold it."""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


def parse_instant(value: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 date or date-time (UTC when no offset), or a duration meaning that long ago."""
    spec = value.strip()
    if _DURATION.match(spec.lower()):
        return (now or datetime.now(UTC)) - parse_duration(spec)
    if (instant := iso_instant(spec)) is None:
        raise ValueError(
            f"not a time: {value!r} (expected ISO 8601 like 2026-01-31T12:00 or an age like 7d)"
        )
    return instant
