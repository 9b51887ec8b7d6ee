"""One clock for people: the block page in Beijing time (display.timezone), its JSON twin and the
logs in UTC, and the Chinese copy in full-width punctuation."""

from __future__ import annotations

import json
import re
import tomllib
from datetime import UTC, datetime, timedelta, timezone

from test_gate_http import curl, split_response

from conftest import REPO
from icpgate.config.display_time import local_text, parse_zone

BEIJING = timezone(timedelta(hours=8))


def test_the_block_page_shows_beijing_time_and_the_json_answer_utc(gate) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    _, _, page = split_response(curl(gate.ports["http"], "example-unfiled.cn"))
    _, _, body = split_response(curl(gate.ports["http"], "example-unfiled.cn", "-H", "Accept: application/json"))
    after = datetime.now(UTC)
    shown = re.search(r"<dt>时间 · Time</dt><dd>(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)（UTC\+08:00）</dd>", page)
    assert shown, page
    moment = datetime.strptime(shown.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=BEIJING)
    assert before <= moment <= after
    stamp = json.loads(body)["time"]
    assert stamp.endswith("Z") and before <= datetime.fromisoformat(stamp.replace("Z", "+00:00")) <= after


def test_chinese_copy_uses_full_width_punctuation() -> None:
    messages = tomllib.loads((REPO / "policies" / "templates" / "messages.toml").read_text(encoding="utf-8"))
    for reason, texts in messages.items():
        for key in ("title_zh", "why_zh", "todo_zh"):
            assert not re.search(r"[,():;]", texts[key]), (reason, key, texts[key])
    page = (REPO / "policies" / "templates" / "block.html").read_text(encoding="utf-8")
    chinese_lines = [line for line in page.splitlines() if re.search(r"[\u4e00-\u9fff]", line) and "<dt>" in line]
    assert chinese_lines and all("(" not in line.split("·")[0] for line in chinese_lines)


def test_zones_parse_and_format() -> None:
    assert local_text("2026-11-22T10:00:04Z", parse_zone("+08:00")) == "2026-11-22 18:00:04"
    assert local_text("2026-11-22T10:00:04Z", parse_zone("Asia/Shanghai")) == "2026-11-22 18:00:04"
    assert local_text(0.0, parse_zone("UTC")) == "1970-01-01 00:00:00"
    for bad in ("Mars/Olympus", "+25:00", ""):
        try:
            parse_zone(bad)
        except ValueError:
            continue
        raise AssertionError("%r was accepted" % bad)
