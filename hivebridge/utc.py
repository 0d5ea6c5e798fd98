"""UTC days: daily token budgets and usage counters start over at 00:00 UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def _utc(now: float | datetime) -> datetime:
    if isinstance(now, datetime):
        return now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    return datetime.fromtimestamp(now, tz=UTC)


def utc_day(now: float | datetime) -> str:
    """The UTC date ("2024-05-01") a daily counter belongs to."""
    return _utc(now).date().isoformat()


def seconds_until_utc_midnight(now: float | datetime) -> float:
    """Seconds until the next 00:00 UTC (in ``(0, 86400]``)."""
    current = _utc(now)
    midnight = datetime.combine(current.date() + timedelta(days=1), datetime.min.time(), UTC)
    return (midnight - current).total_seconds()
