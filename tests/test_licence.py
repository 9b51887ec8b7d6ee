"""Filing numbers: every province, every kind, irregular forms with warnings, garbage refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icpgate.registry.licence import PROVINCE_CODES, LicenceError, LicenceKind, parse_licence


def test_there_are_31_provinces_including_the_icp_specific_ones() -> None:
    assert len(PROVINCE_CODES) == 31
    assert {"黔", "滇", "陇", "蜀"} <= set(PROVINCE_CODES)


@pytest.mark.parametrize("province", sorted(PROVINCE_CODES))
def test_every_province_prefix(province: str) -> None:
    subject = parse_licence("%sICP备12345678号" % province)
    assert (subject.kind, subject.province, subject.warnings) == (LicenceKind.SUBJECT, province, ())
    website = parse_licence("%sICP备2024000001号-3" % province)
    assert (website.kind, website.site, website.subject) == (LicenceKind.WEBSITE, 3, "%sICP备2024000001号" % province)


@pytest.mark.parametrize(
    ("text", "kind", "normalized"),
    [
        ("京ICP备12345678号", LicenceKind.SUBJECT, "京ICP备12345678号"),
        ("京ICP备2024000001号-1", LicenceKind.WEBSITE, "京ICP备2024000001号-1"),
        ("京ICP证110507号", LicenceKind.COMMERCIAL, "京ICP证110507号"),
        ("京ICP证110507号-2", LicenceKind.COMMERCIAL_WEBSITE, "京ICP证110507号-2"),
        ("京公网安备11010802012345号", LicenceKind.PUBLIC_SECURITY, "京公网安备11010802012345号"),
        ("川公网安备51010402000001号", LicenceKind.PUBLIC_SECURITY, "川公网安备51010402000001号"),
    ],
)
def test_regular_forms(text: str, kind: LicenceKind, normalized: str) -> None:
    licence = parse_licence(text)
    assert (licence.kind, licence.normalized, licence.warnings) == (kind, normalized, ())


@pytest.mark.parametrize(
    ("text", "normalized", "warning"),
    [
        ("滇ICP备09010050-5号", "滇ICP备09010050号-5", "before 号"),
        ("京ICP备１２３４５６７８号－１", "京ICP备12345678号-1", "full-width"),
        ("京 ICP 备 12345678 号", "京ICP备12345678号", "spacing"),
        ("京ICP备050025号", "京ICP备050025号", "6-digit"),
        ("川ICP备12345678号", "蜀ICP备12345678号", "irregular province prefix"),
        ("京ICP备12345678", "京ICP备12345678号", "missing 号"),
        ("京公网安备31010802012345号", "京公网安备31010802012345号", "region 31"),
    ],
)
def test_irregular_forms_warn(text: str, normalized: str, warning: str) -> None:
    licence = parse_licence(text)
    assert licence.normalized == normalized
    assert any(warning in w for w in licence.warnings), licence.warnings


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ICP备12345678号",
        "X ICP备12345678号",
        "京ICP备号",
        "京ICP备123号",
        "京ICP备123456789012号",
        "京ICP备12345678号-0",
        "京ICP备12345678号-a",
        "京ICP证1号",
        "京公网安备110108号",
        "京ICX备12345678号",
        "hello",
        "京ICP备12345678号-1-2",
    ],
)
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(LicenceError):
        parse_licence(text)


@given(st.text(max_size=40))
def test_never_raises_anything_but_licence_error(text: str) -> None:
    try:
        licence = parse_licence(text)
    except LicenceError:
        return
    assert parse_licence(licence.normalized).normalized == licence.normalized
