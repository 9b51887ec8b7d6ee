"""Filing numbers: ICP subject and website numbers, commercial licences, public-security numbers.

Regular forms:
    京ICP备12345678号        subject filing (8- or 10-digit body)
    京ICP备12345678号-1      website filing
    京ICP证110507号[-N]      commercial ICP licence (and its websites)
    京公网安备11010802012345号  public-security filing (14 digits, starting with the province code)

Irregular forms seen in the wild are accepted with a warning and normalised: the site number
before 号 (`滇ICP备09010050-5号`), full-width digits or hyphens, spaces, an old-length body, a
general provincial abbreviation where filings use another (川 for 蜀). Anything else is refused.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import Enum

# The 31 provincial prefixes used in ICP numbers, with the first two digits of their
# administrative division code (GB/T 2260), which public-security numbers start with.
PROVINCE_CODES: dict[str, str] = {
    "京": "11", "津": "12", "冀": "13", "晋": "14", "蒙": "15",
    "辽": "21", "吉": "22", "黑": "23",
    "沪": "31", "苏": "32", "浙": "33", "皖": "34", "闽": "35", "赣": "36", "鲁": "37",
    "豫": "41", "鄂": "42", "湘": "43", "粤": "44", "桂": "45", "琼": "46",
    "渝": "50", "蜀": "51", "黔": "52", "滇": "53", "藏": "54",
    "陕": "61", "陇": "62", "青": "63", "宁": "64", "新": "65",
}  # fmt: skip

# General abbreviations that ICP numbers do not use, mapped to the ICP prefix. 川 is regular for
# public-security numbers (川公网安备), irregular for ICP numbers (which use 蜀).
ALTERNATIVE_PREFIXES: dict[str, str] = {"川": "蜀", "贵": "黔", "云": "滇", "甘": "陇"}


class LicenceKind(Enum):
    SUBJECT = "subject"
    WEBSITE = "website"
    COMMERCIAL = "commercial"
    COMMERCIAL_WEBSITE = "commercial_website"
    PUBLIC_SECURITY = "public_security"


class LicenceError(ValueError):
    """A filing number that is not one of the known forms."""


@dataclass(frozen=True, slots=True)
class Licence:
    kind: LicenceKind
    province: str
    body: str
    site: int | None
    normalized: str
    warnings: tuple[str, ...] = ()

    @property
    def subject(self) -> str:
        """The number without its website suffix: what a website number belongs to."""
        return self.normalized.rsplit("-", 1)[0] if self.site is not None else self.normalized


_ICP = re.compile(r"(?P<prov>\S)ICP(?P<type>[备证])(?P<body>\d+)(?:号-(?P<site>\d+)|-(?P<site_before>\d+)号|号)?")
_PSB = re.compile(r"(?P<prov>\S)公网安备(?P<body>\d+)号?")
_SUBJECT_LENGTHS = (8, 10)
_IRREGULAR_SUBJECT_LENGTHS = range(5, 12)
_COMMERCIAL_LENGTH = 6
_IRREGULAR_COMMERCIAL_LENGTHS = range(4, 9)
_PSB_LENGTH = 14


def parse_licence(text: str) -> Licence:
    """Parse any filing number; raise LicenceError with the reason when it is not one."""
    cleaned, warnings = _clean(text)
    if "公网安备" in cleaned:
        return _parse_public_security(cleaned, warnings)
    match = _ICP.fullmatch(cleaned)
    if not match:
        raise LicenceError("not a filing number: %r" % text)
    province = _province(match["prov"], warnings, public_security=False)
    body = match["body"]
    site_text = match["site"] or match["site_before"]
    if match["site_before"]:
        warnings.append("site number before 号 (irregular form)")
    if not cleaned.endswith("号") and not match["site_before"] and not match["site"]:
        warnings.append("missing 号")
    commercial = match["type"] == "证"
    _check_body_length(body, commercial, warnings)
    site = int(site_text) if site_text else None
    if site is not None and site < 1:
        raise LicenceError("website number must be 1 or more: %r" % text)
    kind = _kind(commercial, site)
    normalized = "%sICP%s%s号" % (province, match["type"], body) + ("-%d" % site if site is not None else "")
    return Licence(kind, province, body, site, normalized, tuple(warnings))


def _clean(text: str) -> tuple[str, list[str]]:
    warnings: list[str] = []
    if not isinstance(text, str):
        raise LicenceError("filing number must be a string")
    folded = unicodedata.normalize("NFKC", text)  # full-width digits, letters and hyphens
    cleaned = "".join(folded.split())
    cleaned = cleaned.replace("icp", "ICP").replace("‐", "-").replace("–", "-").replace("—", "-")
    if cleaned != text:
        warnings.append("spacing or full-width characters normalised")
    return cleaned, warnings


def _province(prefix: str, warnings: list[str], *, public_security: bool) -> str:
    if prefix in PROVINCE_CODES:
        return prefix
    if prefix in ALTERNATIVE_PREFIXES:
        if not (public_security and prefix == "川"):
            warnings.append("irregular province prefix %s (filings use %s)" % (prefix, ALTERNATIVE_PREFIXES[prefix]))
        return prefix if public_security else ALTERNATIVE_PREFIXES[prefix]
    raise LicenceError("unknown province prefix %r" % prefix)


def _check_body_length(body: str, commercial: bool, warnings: list[str]) -> None:
    regular = (_COMMERCIAL_LENGTH,) if commercial else _SUBJECT_LENGTHS
    irregular = _IRREGULAR_COMMERCIAL_LENGTHS if commercial else _IRREGULAR_SUBJECT_LENGTHS
    if len(body) in regular:
        return
    if len(body) in irregular:
        warnings.append("irregular %d-digit number body" % len(body))
        return
    raise LicenceError("number body must have %s digits, not %d" % (" or ".join(map(str, regular)), len(body)))


def _kind(commercial: bool, site: int | None) -> LicenceKind:
    if commercial:
        return LicenceKind.COMMERCIAL if site is None else LicenceKind.COMMERCIAL_WEBSITE
    return LicenceKind.SUBJECT if site is None else LicenceKind.WEBSITE


def _parse_public_security(cleaned: str, warnings: list[str]) -> Licence:
    match = _PSB.fullmatch(cleaned)
    if not match:
        raise LicenceError("not a public-security filing number: %r" % cleaned)
    province = _province(match["prov"], warnings, public_security=True)
    body = match["body"]
    if len(body) != _PSB_LENGTH:
        raise LicenceError("public-security number must have %d digits, not %d" % (_PSB_LENGTH, len(body)))
    expected = PROVINCE_CODES.get(province) or PROVINCE_CODES[ALTERNATIVE_PREFIXES[province]]
    if not body.startswith(expected):
        warnings.append("number starts with region %s, not %s's %s" % (body[:2], province, expected))
    if not cleaned.endswith("号"):
        warnings.append("missing 号")
    return Licence(
        LicenceKind.PUBLIC_SECURITY, province, body, None, "%s公网安备%s号" % (province, body), tuple(warnings)
    )


def is_website_licence(licence: Licence) -> bool:
    return licence.kind in (LicenceKind.WEBSITE, LicenceKind.COMMERCIAL_WEBSITE)
