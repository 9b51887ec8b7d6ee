"""Lines json.loads cannot take (nested past the stack, integers of more than 4300 digits), unknown
fields nested past MAX_EXTRA_DEPTH, and a file name that is not UTF-8: through the real CLI (one
process and the parsing pool) and the real feed client, each is refused with its line (or imported),
never a traceback, and a refused file leaves the registry as it was."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from feedkit import Fault, FaultProxy, edge_config, feed_sync, re_signed
from test_feed import new_filing, registry_state
from test_import import digest, registry_path

from conftest import ICPGATE, import_json, run_icpgate, sample_records, write_ndjson
from icpgate.registry.interchange import MAX_EXTRA_DEPTH

BAD_LINE = 5


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def file_with(tmp_path: Path, bad_line: str) -> Path:
    """The samples as updates, with line BAD_LINE replaced by `bad_line`."""
    records = sample_records()
    for record in records:
        record["updated_at"] = "2026-11-21T00:00:00Z"
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    lines[BAD_LINE - 1] = bad_line
    path = tmp_path / "bad.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def with_field(name: str, raw: str) -> str:
    """The sample record of line BAD_LINE with field `name` set to the JSON text `raw`."""
    record = sample_records()[BAD_LINE - 1] | {"updated_at": "2026-11-21T00:00:00Z", name: "@@"}
    return json.dumps(record, ensure_ascii=False).replace('"@@"', raw)


TOO_DEEP = "lists and objects nested too deeply for a JSON parser"
# (the line on BAD_LINE, the field refused, a phrase of the message)
CASES = [
    (nested(100_000), "", TOO_DEEP),
    (with_field("x", nested(100_000)), "", TOO_DEEP),
    (with_field("x", nested(5_000)), "", TOO_DEEP),
    (with_field("status", nested(5_000)), "", TOO_DEEP),
    (with_field("x", nested(MAX_EXTRA_DEPTH + 1)), "x", "nested deeper than 64 levels"),
    (with_field("x", '{"a": %s}' % nested(MAX_EXTRA_DEPTH)), "x", "nested deeper than 64 levels"),
    (with_field("x", nested(900)), "x", "nested deeper than 64 levels"),
    (with_field("status", nested(900)), "status", "a list is not one of"),
    (with_field("x", "1" * 5000), "", "Exceeds the limit (4300 digits)"),
]
IDS = ["bare-100000", "extra-100000", "extra-5000", "status-5000", "extra-65", "extra-object-65", "extra-900",
       "status-900", "long-int"]  # fmt: skip


@pytest.mark.parametrize("jobs", ["1", "2"])
@pytest.mark.parametrize(("line", "field", "message"), CASES, ids=IDS)
def test_a_line_json_cannot_take_is_refused_with_its_line(
    sample_registry: Path, tmp_path: Path, line: str, field: str, message: str, jobs: str
) -> None:
    before = digest(registry_path(sample_registry))
    code, report = import_json(sample_registry, file_with(tmp_path, line), "--jobs", jobs)
    assert (code, report["committed"]) == (4, False)
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(BAD_LINE, field)]
    assert message in report["errors"][0]["message"]
    assert digest(registry_path(sample_registry)) == before


def test_the_message_on_stderr_names_file_and_line(sample_registry: Path, tmp_path: Path) -> None:
    path = file_with(tmp_path, nested(100_000))
    result = run_icpgate("import", str(path), "-c", str(sample_registry))
    assert result.returncode == 4
    assert "Traceback" not in result.stderr
    assert "%s:%d: record: %s" % (path, BAD_LINE, TOO_DEEP) in result.stderr


def test_an_unknown_field_at_the_depth_limit_imports_and_keeps_its_value(config_path: Path, tmp_path: Path) -> None:
    path = file_with(tmp_path, with_field("x", nested(MAX_EXTRA_DEPTH)))
    code, report = import_json(config_path, path, "--jobs", "2")
    assert (code, report["committed"]) == (0, True), report
    with sqlite3.connect(registry_path(config_path)) as conn:
        extras = [json.loads(row[0]) for row in conn.execute("SELECT extra FROM filings")]
    assert {"x": json.loads(nested(MAX_EXTRA_DEPTH))} in extras


# --- a file name that is not UTF-8 ---------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_imports_and_is_shown_escaped(config_path: Path, tmp_path: Path) -> None:
    path = Path(os.fsdecode(bytes(tmp_path) + b"/f\xff.ndjson"))
    write_ndjson(path, sample_records())
    env = os.environ | {"PYTHONIOENCODING": "utf-8:strict"}  # as a UTF-8 locale's pipe: no surrogateescape
    shown = str(tmp_path) + "/f\\xff.ndjson"

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*ICPGATE, "import", os.fsencode(path), "-c", str(config_path), *extra],
                                capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result

    assert "imported %d filings from %s " % (len(sample_records()), shown) in run().stdout
    with sqlite3.connect(registry_path(config_path)) as conn:
        assert [row[0] for row in conn.execute("SELECT source FROM imports")] == [shown]
    assert json.loads(run("--json", "--dry-run").stdout)["source"] == shown


def test_a_refused_file_with_such_a_name_is_named_in_its_errors(sample_registry: Path, tmp_path: Path) -> None:
    path = Path(os.fsdecode(bytes(tmp_path) + b"/g\xff.ndjson"))
    path.write_text(nested(100_000) + "\n", encoding="utf-8")
    result = run_icpgate("import", str(path), "-c", str(sample_registry))
    assert result.returncode == 4
    assert "%s/g\\xff.ndjson:1: record: %s" % (tmp_path, TOO_DEEP) in result.stderr


# --- the feed: a publisher's change set ------------------------------------------------------------


def deepen_last(private: Path) -> Fault:
    """A fault: the body's last line nested 100,000 levels deep, signed."""
    return re_signed(private, lambda lines: [*lines[:-1], nested(100_000).encode()])


def test_a_change_set_nested_too_deeply_is_refused_and_the_registry_stays(
    publisher, tmp_path: Path, keys: dict[str, Path]
) -> None:
    proxy = FaultProxy(publisher.url)
    edge = edge_config(tmp_path / "edge", [proxy.url], [keys["public"]], publisher.edge_token, read_timeout=1)
    assert feed_sync(edge)[1]["result"] == "applied"
    before = registry_state(edge)
    publisher.import_records([new_filing()])

    proxy.fault = deepen_last(keys["private"])
    proxy.paths = ("/feed/v1/changes",)
    code, outcome = feed_sync(edge)
    assert (code, outcome["result"]) == (4, "refused_malformed"), outcome
    assert TOO_DEEP in outcome["message"]
    assert registry_state(edge) == before
    proxy.fault = None
    assert feed_sync(edge)[1]["result"] == "applied"
