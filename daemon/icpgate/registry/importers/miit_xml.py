"""Read the national filing system's download data (企业系统接口规范 V3.0, 企业下载数据格式.xsd):
a `DownloadData` document, GBK, as the operator's enterprise-side system leaves it once unzipped and
decrypted. docs/filings-format.md maps it field by field.

- `ICP/BASJ/Baxx`: one subject (`Zt_xx`) with its websites (`Wz_xx`); each website is one filing.
- `ICP/ZXSJ/Zxxx`: cancellations by the province system's record id (`Jlid`): a subject or a website
  deregistered (注销), or an access record cancelled (取消接入). They are applied to the filings of
  the same file and to the stored ones they name (`Cancellations`).
- `ICP/FFJRHMD`, `ICP/WBAWZLB`: the bureau's lists of illegally accessed and unfiled sites. They
  are not filings; each entry becomes a note for the operator.

The document is parsed as a stream (lxml's iterparse, each record dropped once read), so a file of
a million filings stays in bounded memory. lxml rather than the standard library's ElementTree:
libxml2 reads GBK as declared, selects the records without a Python call per element, and knows
each record's line; with ElementTree's pull parser a million filings took more than twice as long
to import (bench/import_bench.py compares the import with NDJSON's).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from typing import BinaryIO

from lxml import etree

from ..filings import AccessStatus, Filing, FilingStatus
from ..interchange import ParsedFiling, RecordError, parse_filing

# 单位性质 (Dwxz) codes of the filing system: 1 军队, 2 政府机关, 3 事业单位, 4 企业, 5 个人, 6 社会团体.
SUBJECT_TYPES = {"2": "government", "3": "institution", "4": "enterprise", "5": "individual"}
SUBJECT, WEBSITE, ACCESS = 0, 1, 2  # Zxlb: what a cancellation's Jlid names
CANCELLATION_KINDS = {SUBJECT: "主体注销", WEBSITE: "网站注销", ACCESS: "取消接入"}
LIST_NAMES = {"Ffjrxx": "FFJRHMD 非法接入黑名单", "Wbawz_xx": "WBAWZLB 未备案网站列表"}
_RECORD_TAGS = ("Baxx", "Zxxx", "Ffjrxx", "Wbawz_xx")
_MAX_NOTES = 200


@dataclass(frozen=True, slots=True)
class Cancellation:
    kind: int  # SUBJECT, WEBSITE or ACCESS
    record_id: str  # the province system's id: Ztid, Wzid or Jrid
    line: int


@dataclass(slots=True)
class Cancellations:
    """The cancellations of a file, found before its filings are read, and the stored filings they
    name (looked up in the registry by the ids kept with each filing)."""

    items: list[Cancellation] = field(default_factory=list)
    stored: dict[str, Filing] = field(default_factory=dict)  # by licence

    def matching(self, filing: Filing) -> list[Cancellation]:
        ids = {SUBJECT: str(filing.extra.get("miit_ztid", "")), WEBSITE: str(filing.extra.get("miit_wzid", ""))}
        jrids = filing.extra.get("miit_jrids") or {}
        return [c for c in self.items if (c.record_id in jrids if c.kind == ACCESS else c.record_id == ids[c.kind])]


@dataclass(slots=True)
class MiitOptions:
    default_timezone: tzinfo
    isp_ids: dict[str, str]  # Ispid -> our provider id; unlisted Ispids stay as they are
    cancellations: Cancellations = field(default_factory=Cancellations)
    applied: set[Cancellation] = field(default_factory=set)  # matched a filing of the file
    notes: list[str] = field(default_factory=list)  # for the operator: lists, unmatched cancellations


def _records(stream: BinaryIO) -> Iterator[tuple[tuple[str, ...], etree._Element, int]]:
    """(tags of the parent and grandparent, record element, the line it starts on) for each record.

    libxml2 does the parsing and picks the records out (the encoding is the one the declaration
    names: GBK), so no Python runs per element; each record is dropped once it has been read.
    Entities are not expanded, no DTD is loaded and nothing is fetched from the network."""
    events = etree.iterparse(stream, events=("end",), tag=_RECORD_TAGS, resolve_entities=False, load_dtd=False,
                             no_network=True, remove_comments=True)  # fmt: skip
    last_parent, context = None, ("", "")
    try:
        for _, element in events:
            parent = element.getparent()
            if parent is not last_parent:  # the records of one section share it: look up once
                grandparent = parent.getparent() if parent is not None else None
                context = (grandparent.tag if grandparent is not None else "", parent.tag if parent is not None else "")
                last_parent = parent
            yield context, element, element.sourceline or 0
            element.clear(keep_tail=True)
            while parent is not None and element.getprevious() is not None:
                del parent[0]
        root = events.root
    except etree.XMLSyntaxError as error:
        raise RecordError(error.lineno or 0, "", "not well-formed XML: %s" % error.msg) from None
    if root is None or root.tag != "DownloadData":
        tag = root.tag if root is not None else "?"
        raise RecordError(1, "", "not a download file of the filing system: the root element is <%s>, not "
                          "<DownloadData>" % tag)  # fmt: skip


def scan_cancellations(stream: BinaryIO) -> list[Cancellation]:
    """The file's `ZXSJ/Zxxx` records, read before its filings so that both orders work. The
    cancellations of a download are few; a file without `<ZXSJ` is only searched, not parsed."""
    found = []
    for path, element, line in _records(stream):
        if element.tag == "Zxxx" and path == ("ICP", "ZXSJ"):
            kind, record_id = _text(element, "Zxlb"), _text(element, "Jlid")
            if kind in ("0", "1", "2") and record_id.isdigit():
                found.append(Cancellation(int(kind), record_id, line))
    return found


def has_cancellations(stream: BinaryIO) -> bool:
    tail = b""
    while chunk := stream.read(1 << 20):
        if b"<ZXSJ" in tail + chunk:
            return True
        tail = chunk[-8:]
    return False


def read_download(stream: BinaryIO, options: MiitOptions) -> Iterator[ParsedFiling | RecordError]:
    """Yield the filings of a download file (cancellations applied), or the errors that refuse them."""
    seen: set[str] = set()  # stored filings a cancellation names that the file carries too
    for path, element, line in _records(stream):
        tag = element.tag
        if tag == "Baxx" and path == ("ICP", "BASJ"):
            for item in _websites(element, line, options):
                if isinstance(item, ParsedFiling) and item.filing.licence in options.cancellations.stored:
                    seen.add(item.filing.licence)
                yield item
        elif tag == "Zxxx" and path == ("ICP", "ZXSJ"):
            error = _check_cancellation(element, line)
            if error:
                yield error
        elif tag in LIST_NAMES and path[0] == "ICP":
            _note_list_entry(tag, element, line, options)
    yield from _stored_cancellations(options, seen)


def _websites(baxx: etree._Element, line: int, options: MiitOptions) -> Iterator[ParsedFiling | RecordError]:
    subject, websites = _collect(baxx)
    if not websites:
        yield RecordError(line, "Wz_xx", "required element is missing")
    for index, website in enumerate(websites):
        where = "Wz_xx[%d]" % index
        try:
            record = _record(subject, website, where, line, options)
            parsed = parse_filing(record, line)
        except RecordError as error:
            error.field = xml_field(error.field, where)
            yield error
            continue
        cancelled = options.cancellations.matching(parsed.filing) if options.cancellations.items else None
        if cancelled:
            options.applied.update(cancelled)
            parsed = ParsedFiling(line, _cancel(parsed.filing, cancelled), parsed.warnings)
        yield parsed


# The elements a filing is made of, picked out of a `Baxx` in one walk that libxml2 filters.
_WANTED = ("Wz_xx", "Jr_xx", "Ztid", "Dwmc", "Dwxz", "Baxh", "Zjxgsj", "Wzid", "Wzmc", "Ym", "Ispid", "Jrid",
           "Qsip", "Zzip")  # fmt: skip
_WEBSITE, _ACCESS, _DOMAIN, _ACCESS_FIELD, _RANGE_FIELD, _FIELD = range(6)
_ROLES = {"Wz_xx": _WEBSITE, "Jr_xx": _ACCESS, "Ym": _DOMAIN, "Ispid": _ACCESS_FIELD, "Jrid": _ACCESS_FIELD,
          "Qsip": _RANGE_FIELD, "Zzip": _RANGE_FIELD}  # fmt: skip


def _collect(baxx: etree._Element) -> tuple[dict, list[dict]]:
    """(the subject's fields, each website's fields with its domains `Ym` and access records `Jr`).

    One filtered walk in document order instead of a search per field (three times the cost). The
    schema places every subject field before the first website, a website's own `Zjxgsj` and `Baxh`
    after its access records, and each range's `Qsip` before its `Zzip`, so a field is told apart by
    its name and by the latest `Wz_xx` or `Jr_xx` opened."""
    subject: dict = {}
    websites: list[dict] = []
    site: dict = {}
    access: dict = {}
    for element in baxx.iter(*_WANTED):
        role = _ROLES.get(element.tag, _FIELD)
        if role is _FIELD:
            (site if websites else subject).setdefault(element.tag, (element.text or "").strip())
        elif role is _DOMAIN:
            if websites:
                site["Ym"].append((element.text or "").strip())
        elif role is _RANGE_FIELD:
            if access:
                ranges = access["Ip"]
                if element.tag == "Qsip" or not ranges or "Zzip" in ranges[-1]:
                    ranges.append({})
                ranges[-1][element.tag] = (element.text or "").strip()
        elif role is _ACCESS_FIELD:
            if access:
                access.setdefault(element.tag, (element.text or "").strip())
        elif role is _WEBSITE:
            site, access = {"Ym": [], "Jr": []}, {}
            websites.append(site)
        elif websites:  # _ACCESS
            access = {"Ip": []}
            site["Jr"].append(access)
    return subject, websites


_FIELDS = {"licence": "{w}.Baxh", "subject_licence": "Zt_xx.Baxh", "subject_name": "Zt_xx.Dwmc",
           "site_name": "{w}.Wzmc", "updated_at": "{w}.Zjxgsj", "domains": "{w}.Ym_xx"}  # fmt: skip
_INDEXED = re.compile(r"^(domains|access)\[(\d+)\](.*)$")


def xml_field(name: str, where: str) -> str:
    """An interchange field name as the XML element it came from: `domains[1]` -> `Wz_xx[0].Ym_xx[1].Ym`."""
    if name.startswith(("Zt_xx", "Wz_xx")):
        return name
    if name in _FIELDS:
        return _FIELDS[name].format(w=where)
    match = _INDEXED.match(name)
    if match:
        kind, index, rest = match.groups()
        return "%s.%s[%s]%s" % (where, "Ym_xx" if kind == "domains" else "Jr_xx", index,
                                ".Ym" if kind == "domains" else rest.replace(".ips", ".Ip_xx"))  # fmt: skip
    return "%s (%s)" % (where, name) if name else where


def _record(subject: dict[str, str], site: dict, where: str, line: int, options: MiitOptions) -> dict:
    """One website of a subject in the interchange form (docs/filings-format.md)."""
    subject_licence = _required(subject, "Baxh", "Zt_xx", line)
    licence = _required(site, "Baxh", where, line)
    modified = site.get("Zjxgsj") or _required(subject, "Zjxgsj", "Zt_xx", line)
    access, jrids = [], {}
    for index, entry in enumerate(site["Jr"]):
        ispid = entry.get("Ispid") or _required(entry, "Ispid", "%s.Jr_xx[%d]" % (where, index), line)
        provider = options.isp_ids.get(ispid, ispid)
        ips: list[str] = []
        for number, bounds in enumerate(entry["Ip"]):
            try:
                ips.extend(_cidrs(bounds.get("Qsip", ""), bounds.get("Zzip", "")))
            except ValueError as error:
                raise RecordError(line, "%s.Jr_xx[%d].Ip_xx[%d]" % (where, index, number), str(error)) from None
        access.append({"provider": provider, "status": "active", "ips": ips})
        if entry.get("Jrid"):
            jrids[entry["Jrid"]] = provider
    return {
        "licence": licence,
        "subject_licence": subject_licence,
        "subject_name": _required(subject, "Dwmc", "Zt_xx", line),
        "subject_type": SUBJECT_TYPES.get(subject.get("Dwxz", ""), "other"),
        "site_name": _required(site, "Wzmc", where, line),
        "status": "approved",
        "domains": site["Ym"],
        "access": access,
        "updated_at": local_timestamp(modified, options.default_timezone, "%s.Zjxgsj" % where, line),
        "miit_ztid": subject.get("Ztid", ""),
        "miit_wzid": site.get("Wzid", ""),
        "miit_jrids": jrids,
    }


@lru_cache(maxsize=65536)
def _cidrs(first: str, last: str) -> tuple[str, ...]:
    """`Qsip`..`Zzip` as CIDR blocks. The schema gives IPv4 addresses as integers; an address in
    text (IPv4 or IPv6, as newer exports write them) is taken as well. A provider's few ranges
    repeat across all its filings: each is summarised once."""
    start, end = _address(first), _address(last)
    if start.version != end.version or end < start:
        raise ValueError("Qsip %s .. Zzip %s is not a range" % (start, end))
    return tuple(str(network) for network in ipaddress.summarize_address_range(start, end))


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if text.isdigit():
        if int(text) > 0xFFFFFFFF:
            raise ValueError("%s is beyond the IPv4 range an integer address may name" % text)
        return ipaddress.IPv4Address(int(text))
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("%r is neither an integer IPv4 address nor an IP address" % text) from None


_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y%m%d%H%M%S", "%Y/%m/%d %H:%M:%S", "%Y/%m/%d")


def local_timestamp(text: str, zone: tzinfo, where: str, line: int) -> str:
    """A filing-system time (`2026-11-02 08:00:00`, no zone: `import.default_timezone`) as UTC RFC 3339."""
    try:
        return _utc(text, zone)
    except ValueError:
        raise RecordError(line, where, "%r is not a time like 2026-11-02 08:00:00" % text) from None


def _utc(text: str, zone: tzinfo) -> str:
    value = text.strip()
    if len(value) == 19 and value[10] == " " and value[13] == ":" and _whole_hours(zone):
        return _utc_hour(value[:13], zone) + value[13:] + "Z"  # `2026-11-20 16:00:00`: the usual form
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        for form in _TIME_FORMATS:
            try:
                moment = datetime.strptime(value, form)
                break
            except ValueError:
                continue
        else:
            raise ValueError(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(UTC).replace(tzinfo=None, microsecond=0).isoformat() + "Z"


@lru_cache(maxsize=4096)
def _whole_hours(zone: tzinfo) -> bool:
    offset = zone.utcoffset(None) if not hasattr(zone, "key") else None
    return offset is not None and offset.total_seconds() % 3600 == 0


@lru_cache(maxsize=65536)
def _utc_hour(hour: str, zone: tzinfo) -> str:
    """`2026-11-20 16` in a zone of whole-hour offset -> `2026-11-20T08` in UTC; the minutes stay."""
    moment = datetime.fromisoformat(hour + ":00").replace(tzinfo=zone).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H")


def _text(element: etree._Element, name: str) -> str:
    return (element.findtext(name) or "").strip()


def _required(fields: dict[str, str], name: str, where: str, line: int) -> str:
    value = fields.get(name, "")
    if not value:
        raise RecordError(line, "%s.%s" % (where, name), "required element is missing or empty")
    return value


def _check_cancellation(element: etree._Element, line: int) -> RecordError | None:
    kind, record_id = _text(element, "Zxlb"), _text(element, "Jlid")
    if kind not in ("0", "1", "2"):
        return RecordError(line, "Zxxx.Zxlb", "%r is not 0 (subject), 1 (website) or 2 (access)" % kind)
    if not record_id.isdigit():
        return RecordError(line, "Zxxx.Jlid", "%r is not a record id" % record_id)
    return None


def _cancel(filing: Filing, cancellations: Iterable[Cancellation]) -> Filing:
    """注销 (a subject or a website) deregisters the filing; 取消接入 cancels that provider's access."""
    status, access = filing.status, list(filing.access)
    jrids = filing.extra.get("miit_jrids") or {}
    for cancellation in cancellations:
        if cancellation.kind == ACCESS:
            provider = jrids[cancellation.record_id]
            access = [replace(a, status=AccessStatus.CANCELLED) if a.provider == provider else a for a in access]
        else:
            status = FilingStatus.DEREGISTERED
    return replace(filing, status=status, access=tuple(access))


def _stored_cancellations(options: MiitOptions, seen: set[str]) -> Iterator[ParsedFiling]:
    """Stored filings a cancellation names, updated; a cancellation that names nothing is noted."""
    cancellations = options.cancellations
    matched: set[Cancellation] = set()
    for licence, filing in cancellations.stored.items():
        hits = cancellations.matching(filing)
        matched.update(hits)
        if licence in seen or not hits:
            continue  # the file itself carried the filing: already updated
        changed = _cancel(filing, hits)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        yield ParsedFiling(min(hit.line for hit in hits), replace(changed, updated_at=now), ())
    for cancellation in cancellations.items:
        if cancellation not in matched and cancellation not in options.applied:
            _note(options, "line %d: %s of record %s: no filing with that id is stored or in this file; ignored"
                  % (cancellation.line, CANCELLATION_KINDS[cancellation.kind], cancellation.record_id))  # fmt: skip


def _note_list_entry(tag: str, element: etree._Element, line: int, options: MiitOptions) -> None:
    domain = _text(element, "Ym") or _text(element, "Wzym_mc")
    raw_ip = _text(element, "Ip") or _text(element, "IP")
    try:
        ip = str(_address(raw_ip))
    except ValueError:
        ip = raw_ip or "-"
    _note(options, "line %d: %s lists %s at %s; not a filing: the gate blocks it unless a filing covers it"
          % (line, LIST_NAMES[tag], domain or "-", ip))  # fmt: skip


def _note(options: MiitOptions, text: str) -> None:
    if len(options.notes) < _MAX_NOTES:
        options.notes.append(text)
    elif len(options.notes) == _MAX_NOTES:
        options.notes.append("… more notes left out")
