"""The canonical form of a filing, and so its digest, never changes: publishers and edges of
different versions add up each other's digests (docs/feed-protocol.md). Filing.canonical_json has
orjson write it when that gives the same bytes as json.dumps and json.dumps otherwise; these tests
hold it to the json.dumps form it always had, on records the importer reads and on arbitrary
`extra`, and pin the digests of a few records so that any change to the form fails here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icpgate.registry.filings import AccessRecord, AccessStatus, Filing, FilingStatus, SubjectType
from icpgate.registry.interchange import KNOWN_FIELDS, ParsedFiling, RecordError, read_ndjson


def reference(filing: Filing) -> str:
    """The canonical form as written before orjson (commit de2d66b), kept here as the oracle."""
    record = filing.to_json()
    record["domains"] = sorted(filing.domains)
    record["access"] = sorted(
        ({"provider": a.provider, "status": a.status.value, "ips": sorted(a.ips)} for a in filing.access),
        key=lambda access: (access["provider"], access["status"], access["ips"]),
    )
    return json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def outcome(make) -> object:
    """What `make()` returns, or the type of what it raises: the two forms must also fail alike."""
    try:
        return make()
    except Exception as error:
        return type(error)


def assert_same_form(filing: Filing) -> None:
    expected = outcome(lambda: reference(filing))
    assert outcome(filing.canonical_json) == expected
    expected_bytes = outcome(lambda: reference(filing).encode())
    assert outcome(filing.canonical_bytes) == expected_bytes
    assert outcome(filing.digest) == outcome(lambda: hashlib.sha256(reference(filing).encode()).digest())


def built(extra: dict, access: tuple[AccessRecord, ...] = ()) -> Filing:
    """A filing made directly, as the store and the feed client make them."""
    return Filing(
        licence="京ICP备12345678号-1", subject_licence="京ICP备12345678号", subject_name="示例",
        subject_type=SubjectType.OTHER, site_name="站点", status=FilingStatus.APPROVED, limit_access=False,
        domains=("b.example.cn", "a.example.cn"), access=access, updated_at="2026-01-01T00:00:00Z", extra=extra,
    )  # fmt: skip


def parsed(line: str) -> Filing:
    """A filing as the NDJSON importer reads it."""
    (item,) = read_ndjson([line])
    assert isinstance(item, ParsedFiling), item
    return item.filing


# Where orjson and json.dumps could part: escapes, U+2028/9, DEL, lone surrogates (orjson refuses
# them), characters outside the BMP and around the sort order of keys. The importer refuses lone
# surrogates (tests/test_import_unicode.py), so the records it reads have none; filings built
# directly may.
TRICKY = '\x00\x01\x08\t\n\x0c\r\x1f "\\/\x7f\x80\u00e9\u2028\u2029\ud7ff\ud800\udbff\udc00\udfff\ue000\uffff\U0001f600'
VALID = TRICKY.translate(dict.fromkeys(range(0xD800, 0xE000)))  # without the lone surrogates
text = st.text(st.one_of(st.sampled_from(TRICKY), st.characters(exclude_categories=())), max_size=12)
valid_text = st.text(st.one_of(st.sampled_from(VALID), st.characters(exclude_categories=("Cs",))), max_size=12)
integers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**40]),
)
floats = st.one_of(st.floats(), st.sampled_from([0.1, 1e300, 1e-7, 1e16, -0.0, 5e-324, 1.7976931348623157e308]))


def extras_of(text: st.SearchStrategy[str]) -> st.SearchStrategy[dict]:
    """Unknown fields of any JSON kind, their strings and keys drawn from `text`."""
    json_values = st.recursive(
        st.one_of(st.none(), st.booleans(), integers, floats, text),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
        max_leaves=12,
    )
    return st.dictionaries(text.filter(lambda key: key not in KNOWN_FIELDS), json_values, max_size=5)


extras = extras_of(text)
valid_extras = extras_of(valid_text)  # what the importer reads

PROVINCES = "京津冀沪粤蜀"
DOMAINS = ["b.example.cn", "A.example.com", "z.example.net", "xn--fiqs8s.cn", "中国.example.cn", "a.example.cn"]
names = st.text(st.sampled_from(VALID + "公司站点ab"), min_size=1, max_size=8).filter(str.strip)
providers = st.text(st.sampled_from('IDC-ABCé\u2028\x7f "\\\ud800'), min_size=1, max_size=6).filter(str.strip)
valid_providers = st.text(st.sampled_from('IDC-ABCé\u2028\x7f "\\'), min_size=1, max_size=6).filter(str.strip)
networks = st.sampled_from(["203.0.113.0/24", "192.0.2.1", "2001:db8::/48", "198.51.100.0/25", "10.0.0.0/8"])
access_records = st.fixed_dictionaries(
    {"provider": valid_providers, "status": st.sampled_from([s.value for s in AccessStatus])},
    optional={"ips": st.lists(networks, max_size=3, unique=True)},
)


@st.composite
def records(draw) -> dict:
    """An interchange record the importer accepts, with unknown fields of any JSON kind."""
    province = draw(st.sampled_from(PROVINCES))
    body = draw(st.integers(min_value=10_000_000, max_value=99_999_999))
    spellings = st.sampled_from(["%sICP备%d号", "%s ICP备%d号", "%sicp备%d号"])  # the last two are normalised
    record = {
        **draw(valid_extras),
        "licence": (draw(spellings) % (province, body)) + "-%d" % draw(st.integers(min_value=1, max_value=12)),
        "subject_licence": draw(spellings) % (province, body),
        "subject_name": draw(names),
        "subject_type": draw(st.sampled_from([s.value for s in SubjectType])),
        "site_name": draw(names),
        "status": draw(st.sampled_from([s.value for s in FilingStatus])),
        "domains": draw(st.lists(st.sampled_from(DOMAINS), min_size=1, max_size=4)),
        "access": draw(st.lists(access_records, max_size=3)),
        "updated_at": "2026-12-07T10:00:00+08:00",
    }
    if draw(st.booleans()):
        record["limit_access"] = draw(st.booleans())
    return record


@settings(max_examples=400, deadline=None)
@given(records())
def test_imported_records_keep_their_canonical_form(record: dict) -> None:
    """Through the importer's own path: a JSON line (NaN, Infinity, big ints as the standard library
    reads them), parsed and checked."""
    assert_same_form(parsed(json.dumps(record)))


@settings(max_examples=400, deadline=None)
@given(extras, st.lists(st.tuples(providers, st.sampled_from(list(AccessStatus)), st.lists(networks)), max_size=3))
def test_any_extra_keeps_its_canonical_form(extra: dict, access: list) -> None:
    """Filings built directly, with any JSON in `extra`."""
    assert_same_form(built(extra, tuple(AccessRecord(p, s, tuple(ips)) for p, s, ips in access)))


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 2**64},  # beyond orjson's ints
        {"t": (1, 2)},  # a tuple: json.dumps writes a list
        {1: "int key"},  # json.dumps refuses to sort it among str keys
        {"f": 1.0},
        {"k": True, "deep": json.loads("[" * 300 + "]" * 300)},  # beyond orjson's depth
        {"\ud800": "lone surrogate key"},
        {"e": AccessStatus.ACTIVE},  # a str subclass
    ],
)
def test_extra_orjson_would_write_otherwise(extra: dict) -> None:
    assert_same_form(built(extra))


def test_a_cycle_in_extra_is_refused_as_before() -> None:
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        built({"loop": loop}).digest()


# Records whose digests were computed by the code before orjson (commit de2d66b). If one of these
# fails, the canonical form has changed and every registry's checksum with it: do not update the pins.
PINNED = [
    (
        '{"licence":"津ICP备0000000001号-1","subject_licence":"津ICP备0000000001号","subject_name":"基准测试公司1",'
        '"subject_type":"enterprise","site_name":"基准站点1","status":"approved","limit_access":false,'
        '"domains":["bench-site-1.com.cn"],"access":[{"provider":"IDC-EXAMPLE","status":"active",'
        '"ips":["203.0.113.0/24","2001:db8::/48"]}],"updated_at":"2026-11-20T08:00:00Z"}',
        "2b4ce9383aaca18ab08dca871666444a809f82be2602696555d7150736c67680",
    ),
    (
        '{"licence":"黑ICP备0000000007号-1","subject_licence":"黑ICP备0000000007号","subject_name":"基准测试公司7",'
        '"subject_type":"enterprise","site_name":"基准站点7","status":"approved","limit_access":false,'
        '"domains":["bench-site-7.com.cn"],"access":[{"provider":"IDC-EXAMPLE","status":"active",'
        '"ips":["203.0.113.0/24"]}],"updated_at":"2026-11-20T08:00:07Z","miit_ztid":"8","miit_wzid":"8",'
        '"miit_jrids":{"8":"IDC-EXAMPLE"}}',
        "798aebc8a66aa7ebc2d9baffcd28a9ce09e4ad4bcfdcc432b0bb7b246c885f3d",
    ),
    (
        r'{"licence":"粤ICP备12345678号-3","subject_licence":"粤ICP备12345678号","subject_name":" 示例\"公司\\ ",'
        r'"subject_type":"enterprise","site_name":"站点\u2028名\u2029","status":"pending","limit_access":true,'
        r'"domains":["b.example.cn","A.Example.CN","xn--fiqs8s.cn"],"access":[{"provider":"Zeta","status":"active",'
        r'"ips":["198.51.100.0/24","192.0.2.1"]},{"provider":"Alpha","status":"cancelled","ips":["2001:db8::/32"]}],'
        r'"updated_at":"2026-12-07T10:00:00+08:00","备注":"控制\u0001\u001f\u007f\t\n字符",'
        r'"Zkey":[null,true,false,0,-1,9223372036854775807,{"b":"\\","a":"\""}],"ákey":{"é":[],"e":{}}}',
        "8a4d80a4fc8e64f81defba6309f5da2fa68d9f51978d1367dc88f0f589ec93c0",
    ),
    (
        '{"licence":"京ICP证110507号-1","subject_licence":"京ICP证110507号","subject_name":"浮点","subject_type":"other",'
        '"site_name":"x","status":"approved","domains":["float.example.com"],"access":[],'
        '"updated_at":"2026-01-01T00:00:00Z","f":[1.5,0.1,1e300,-0.0,1E-7,NaN,Infinity,-Infinity],'
        '"big":[18446744073709551616,-9223372036854775809,123456789012345678901234567890]}',
        "f4c04c92640e938dd2c28c3de73c544fa7cc373c27f176a7ba465f17797a3e15",
    ),
]


@pytest.mark.parametrize(("line", "digest"), PINNED)
def test_pinned_digests(line: str, digest: str) -> None:
    filing = parsed(line)
    assert filing.digest().hex() == digest
    assert hashlib.sha256(filing.canonical_json().encode()).hexdigest() == digest


def test_usual_records_take_the_fast_path() -> None:
    """The speed is the point: records with no unknown fields, or plain ones, are written by orjson."""
    assert isinstance(parsed(PINNED[0][0])._canonical(), bytes)
    assert isinstance(parsed(PINNED[1][0])._canonical(), bytes)
    assert isinstance(parsed(PINNED[3][0])._canonical(), str)  # floats: json.dumps


def test_a_lone_surrogate_still_has_no_digest() -> None:
    """json.loads reads `\\ud800` into a str UTF-8 cannot encode: the importer refuses the record
    now, and a filing built with one anyway has no digest, as it never had."""
    line = PINNED[0][0].replace('"subject_name":"基准测试公司1"', r'"subject_name":"a\ud800"')
    (item,) = read_ndjson([line])
    assert isinstance(item, RecordError) and item.field == "subject_name", item
    filing = replace(parsed(PINNED[0][0]), subject_name="a\ud800")
    assert filing.canonical_json() == reference(filing)
    with pytest.raises(UnicodeEncodeError):
        filing.digest()
