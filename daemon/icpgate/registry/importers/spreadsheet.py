"""Spreadsheets as operators export them (CSV from Excel or WPS): Chinese or English column headers,
Chinese values (已备案, 企业, 正常 ...), dates in Excel's forms, full-width separators in multi-value
cells, blank rows. Every accepted alias is listed in docs/filings-format.md.

Each row is one access record of a filing (docs/filings-format.md, CSV); rows are turned into
interchange records and checked like NDJSON, but with every wrong field of a row reported, since
a person fixes the sheet by hand.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta, tzinfo

from ..interchange import CSV_COLUMNS, ParsedFiling, RecordError, parse_filing, record_errors

# Header aliases, compared after normalising: case, spaces, full-width brackets, `*` marks of required columns.
HEADERS = {
    "licence": ("licence", "网站备案号", "备案号", "网站备案/许可证号", "网站备案许可证号", "icp备案号"),
    "subject_licence": ("subject_licence", "主体备案号", "主体备案/许可证号", "主体备案许可证号"),
    "subject_name": ("subject_name", "主办单位名称", "主办单位", "主办者名称", "主办者", "单位名称"),
    "subject_type": ("subject_type", "主办单位性质", "单位性质", "主体性质", "主办者性质"),
    "site_name": ("site_name", "网站名称"),
    "status": ("status", "备案状态", "网站备案状态", "状态"),
    "limit_access": ("limit_access", "限制接入", "是否限制接入"),
    "domains": ("domains", "网站域名", "域名", "域名列表"),
    "access_provider": ("access_provider", "接入服务商", "接入商", "接入服务商编号", "接入商编号"),
    "access_status": ("access_status", "接入状态", "接入备案状态"),
    "access_ips": ("access_ips", "接入ip", "ip地址", "网站ip", "接入地址", "ip"),
    "updated_at": ("updated_at", "更新时间", "最近修改时间", "最后更新时间", "审核通过时间", "审核通过日期",
                   "审核时间"),
}  # fmt: skip
VALUES = {
    "status": {
        "approved": ("approved", "已备案", "备案通过", "审核通过", "已通过", "通过", "正常"),
        "pending": ("pending", "审核中", "待审核", "管局审核中", "备案审核中", "初审中"),
        "deregistered": ("deregistered", "已注销", "注销", "备案已注销"),
    },
    "subject_type": {
        "enterprise": ("enterprise", "企业", "公司"),
        "individual": ("individual", "个人"),
        "government": ("government", "政府机关", "政府", "机关"),
        "institution": ("institution", "事业单位"),
        "other": ("other", "其他", "军队", "社会团体", "民办非企业单位", "基金会", "律师执业机构"),
    },
    "access_status": {
        "active": ("active", "正常", "已接入", "接入中", "有效"),
        "first_review": ("first_review", "初审通过", "已初审", "接入初审通过", "待管局审核"),
        "cancelled": ("cancelled", "已取消接入", "取消接入", "已取消", "已注销"),
    },
    "limit_access": {
        "true": ("true", "1", "yes", "是", "限制", "限制接入", "已限制"),
        "false": ("false", "0", "no", "", "否", "不限制", "正常"),
    },
}
# Columns that would carry personal data are dropped, with a note: the registry keeps none.
PERSONAL = re.compile(r"证件|身份证|电话|手机|邮箱|邮件|负责人|联系人|地址|phone|mobile|e-?mail|id_?number|address",
                      re.I)  # fmt: skip
SEPARATORS = re.compile(r"[;；、，,\s]+")
_BRACKETS = str.maketrans({"（": "(", "）": ")", "：": ":", "　": " "})
_EXCEL_EPOCH = datetime(1899, 12, 30)
_DATE_FORMS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y/%m/%d %H:%M:%S", "%Y/%m/%d %H:%M", "%Y/%m/%d",
               "%Y.%m.%d", "%Y%m%d")  # fmt: skip
_EXCEL_SERIAL = re.compile(r"\d{5}(\.\d+)?")  # a day number, compiled once: sheet_time runs for each row
_CHINESE_DATE = re.compile(r"^(\d{4})年(\d{1,2})月(\d{1,2})日(?:\s*(\d{1,2})[时:](\d{1,2})分?(?:(\d{1,2})秒?)?)?$")


def _key(header: str) -> str:
    return re.sub(r"[\s*_]", "", header.translate(_BRACKETS).strip().strip("\ufeff").lower())


_HEADER_OF = {_key(alias): column for column, aliases in HEADERS.items() for alias in aliases}
_VALUE_OF = {
    field: {alias.lower(): value for value, aliases in table.items() for alias in aliases}
    for field, table in VALUES.items()
}


class _Lines:
    """The lines the csv reader takes, noting when it asked past the last one: a row it returns
    after that was cut inside a quoted cell (a quoted cell is the only thing it reads on for)."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = iter(lines)
        self.last = ""
        self.ended = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        try:
            self.last = next(self.lines)
        except StopIteration:
            self.ended = True
            raise
        return self.last


def read_spreadsheet(lines: Iterable[str], zone: tzinfo, notes: list[str]) -> Iterator[ParsedFiling | RecordError]:
    """Yield filings from a spreadsheet's CSV text: one access record per row, rows of a licence merged."""
    source = _Lines(lines)
    reader = csv.reader(source)
    header = next(reader, None)
    if header is None:
        yield RecordError(1, "", "the file is empty")
        return
    columns = _columns(header, notes)
    missing = [c for c in CSV_COLUMNS if c not in columns.values() and c != "limit_access"]
    if missing:
        yield RecordError(1, missing[0], "the header lacks column(s): %s (see docs/filings-format.md for the "
                          "accepted names)" % ", ".join(missing))  # fmt: skip
        return
    merged: dict[str, tuple[int, dict]] = {}
    for row in reader:
        line = reader.line_num
        if source.ended:
            yield RecordError(line, _column_name(len(row) - 1, header, columns), "truncated: the file ends at column"
                              " %d, inside this quoted cell" % (len(source.last) + 1))  # fmt: skip
            break
        if not any(cell.strip() for cell in row):
            continue  # blank rows, and the empty rows Excel leaves at the end
        record, errors = _row_record(row, columns, header, line, zone)
        if errors:
            yield from errors
            continue
        key = record["licence"]
        if key in merged:
            first_line, first = merged[key]
            conflicts = [name for name, value in first.items() if name != "access" and record.get(name) != value]
            if conflicts:
                yield from (RecordError(line, name, "differs from the row at line %d for the same licence" % first_line)
                            for name in conflicts)  # fmt: skip
            else:
                first["access"].extend(record["access"])
            continue
        merged[key] = (line, record)
    for line, record in merged.values():
        try:
            yield parse_filing(record, line)
        except RecordError:
            yield from record_errors(record, line)


def _columns(header: list[str], notes: list[str]) -> dict[int, str]:
    """Column index -> field; unknown columns are kept as extra fields unless they hold personal data."""
    columns: dict[int, str] = {}
    for index, name in enumerate(header):
        field = _HEADER_OF.get(_key(name))
        if field and field not in columns.values():
            columns[index] = field
        elif field is None and name.strip():
            if PERSONAL.search(name):
                notes.append("column %r left out: the registry keeps no personal data" % name.strip())
            else:
                columns[index] = "extra:" + name.strip().strip("\ufeff")
    return columns


def _row_record(row: list[str], columns: dict[int, str], header: list[str], line: int,
                zone: tzinfo) -> tuple[dict, list[RecordError]]:  # fmt: skip
    if len(row) > len(header) and any(cell.strip() for cell in row[len(header) :]):
        return {}, [RecordError(line, "", "more cells than header columns")]
    cells = {field: (row[index] if index < len(row) else "").strip() for index, field in columns.items()}
    record: dict[str, object] = {f.removeprefix("extra:"): v for f, v in cells.items() if f.startswith("extra:") and v}
    for name in ("licence", "subject_licence", "subject_name", "site_name"):
        record[name] = cells[name]
    record["status"] = _value("status", cells["status"])
    record["subject_type"] = _value("subject_type", cells["subject_type"])
    record["domains"] = split_cell(cells["domains"])
    provider = cells["access_provider"]
    record["access"] = (
        [{"provider": provider, "status": _value("access_status", cells["access_status"]),
          "ips": split_cell(cells["access_ips"])}]
        if provider else []
    )  # fmt: skip
    errors: list[RecordError] = []
    try:
        record["limit_access"] = _value("limit_access", cells.get("limit_access", ""), strict=True) == "true"
    except ValueError as error:
        errors.append(RecordError(line, "limit_access", str(error)))
    try:
        record["updated_at"] = sheet_time(cells["updated_at"], zone)
    except ValueError as error:
        errors.append(RecordError(line, "updated_at", str(error)))
    probe = {"limit_access": False, "updated_at": "2000-01-01T00:00:00Z", **record}  # converted, or a stand-in
    try:
        parse_filing(probe, line)
    except RecordError:
        errors.extend(record_errors(probe, line))
    for error in errors:
        error.field = _sheet_field(error.field, header, columns)
    order = {name: rank for rank, name in enumerate(CSV_COLUMNS)}
    return record, sorted(errors, key=lambda error: order.get(re.split(r"[\[ ]", error.field)[0], 99))


def _column_name(index: int, header: list[str], columns: dict[int, str]) -> str:
    """The column at `index` as errors name it: `domains (网站域名)`, or the sheet's own title."""
    field = columns.get(index, "")
    if field and not field.startswith("extra:"):
        return _sheet_field(field, header, columns)
    return header[index].strip().strip("\ufeff") if index < len(header) else ""


def _sheet_field(field: str, header: list[str], columns: dict[int, str]) -> str:
    """`access[0].status` -> `access_status (接入状态)`: the column as the sheet names it. An unknown
    column's field (an extra field, refused for its text) is the sheet's own title already."""
    match = re.match(r"^([a-z_]+)(.*)$", field)
    if not match:
        return field
    name, rest = match.groups()
    if name == "access":
        sub = re.match(r"^\[0\]\.?([a-z]+)?(.*)$", rest)
        name, rest = ("access_" + sub.group(1), sub.group(2)) if sub and sub.group(1) else ("access_provider", "")
    titles = {field: header[index].strip().strip("\ufeff") for index, field in columns.items()}
    title = titles.get(name, "")
    return "%s%s (%s)" % (name, rest, title) if title and title != name else name + rest


def _value(field: str, text: str, strict: bool = False) -> str:
    """A Chinese or English alias as the interchange value; unknown text passes on to be refused there."""
    value = _VALUE_OF[field].get(text.strip().lower())
    if value is None and strict:
        raise ValueError("%r is not one of: %s" % (text, ", ".join(a for aliases in VALUES[field].values()
                                                                   for a in aliases if a)))  # fmt: skip
    return value if value is not None else text


def split_cell(cell: str) -> list[str]:
    """Several values in one cell, separated by `;` `；` `、` `，` `,` or white space."""
    return [part for part in SEPARATORS.split(cell.strip()) if part]


def sheet_time(text: str, zone: tzinfo) -> str:
    """A spreadsheet time as UTC RFC 3339. Without a zone it is in `zone` (Beijing time by default).
    Takes RFC 3339, `2026-11-02 08:00`, `2026/11/02`, `2026年11月2日`, and Excel's serial day numbers."""
    value = text.strip()
    if not value:
        raise ValueError("required: a time such as 2026-11-02 08:00")
    moment: datetime | None = None
    if _EXCEL_SERIAL.fullmatch(value):
        moment = _EXCEL_EPOCH + timedelta(days=float(value))  # Excel's serial day number (1900 system)
        moment = moment.replace(microsecond=0) + timedelta(seconds=round(moment.microsecond / 1e6))
    elif match := _CHINESE_DATE.match(value):
        year, month, day, hour, minute, second = (int(part or 0) for part in match.groups())
        moment = _checked(lambda: datetime(year, month, day, hour, minute, second), text)
    else:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            for form in _DATE_FORMS:
                try:
                    moment = datetime.strptime(value, form)
                    break
                except ValueError:
                    continue
    if moment is None:
        raise ValueError("%r is not a time (2026-11-02 08:00, 2026/11/02, 2026年11月2日 or RFC 3339)" % text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _checked(build, text: str) -> datetime:
    try:
        return build()
    except ValueError:
        raise ValueError("%r is not a valid date" % text) from None
