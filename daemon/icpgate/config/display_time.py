"""One clock for people: times shown to operators and visitors in one zone (`display.timezone`,
Beijing time by default), while JSON, the API and logs stay UTC ISO 8601.

A zone is a fixed offset (`+08:00`, `UTC`) or an IANA name (`Asia/Shanghai`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

BEIJING = timezone(timedelta(hours=8), "UTC+08:00")
_OFFSET = re.compile(r"^(?:UTC|GMT)?([+-])(\d{1,2}):?(\d{2})?$")


def parse_zone(text: str) -> tzinfo:
    """`+08:00`, `+0800`, `UTC+8`, `UTC`, `Z` or an IANA name; ValueError says what it expects."""
    value = text.strip()
    if value.upper() in ("UTC", "Z", "GMT"):
        return UTC
    match = _OFFSET.match(value)
    if match:
        sign, hours, minutes = match.groups()
        offset = timedelta(hours=int(hours), minutes=int(minutes or 0))
        if offset >= timedelta(hours=24):
            raise ValueError("%r: an offset must be under 24 hours" % text)
        return timezone(-offset if sign == "-" else offset, "UTC%s%02d:%02d" % (sign, int(hours), int(minutes or 0)))
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("%r is neither an offset like +08:00 nor a zone name like Asia/Shanghai" % text) from None


def zone_label(zone: tzinfo) -> str:
    """How the zone is named next to a time: `UTC+08:00`, or the IANA name."""
    return str(zone) if isinstance(zone, ZoneInfo) else (zone.tzname(None) or "UTC")


def from_iso(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def local_text(moment: str | float | datetime | None, zone: tzinfo, seconds: bool = True) -> str:
    """`2026-11-22 18:00:04` in `zone`, from a UTC ISO string, a Unix time or an aware datetime."""
    if moment is None or moment == "":
        return "-"
    if isinstance(moment, str):
        moment = from_iso(moment)
    elif not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")
