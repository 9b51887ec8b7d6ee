"""Import time of a download file of the national filing system against NDJSON of the same filings.

    python bench/import_bench.py [COUNT]        (default 1,000,000; files and registries in bench/out/)

Writes both files with bench/gen_filings.py (once), imports each into a fresh registry with the real
`icpgate import` under /usr/bin/time, checks that both registries hold the same filings (same
checksum), and prints wall time, CPU time (user + system: steadier than wall time on a shared
machine), peak RSS and the ratios. The goal: XML at most 1.5 times NDJSON.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
REPO = ROOT.parent


def config(path: Path, registry: Path) -> Path:
    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    text = text.replace('path = "var/registry.db"', 'path = "%s"' % registry)
    text = text.replace('pack = "policies/default.toml"', 'pack = "%s"' % (REPO / "policies" / "default.toml"))
    text = text.replace("isp_ids = {}", 'isp_ids = {"10001" = "IDC-EXAMPLE"}')
    path.write_text(text, encoding="utf-8")
    return path


def timed_import(data: Path, name: str) -> tuple[float, float, str]:
    registry = OUT / ("import-bench-%s.db" % name)
    for stale in OUT.glob(registry.name + "*"):
        stale.unlink()
    conf = config(OUT / ("import-bench-%s.toml" % name), registry)
    started = time.monotonic()
    result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "icpgate", "import", str(data), "-c",
                             str(conf)], capture_output=True, text=True, check=True)  # fmt: skip
    elapsed = time.monotonic() - started
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) * 1024
    cpu = sum(float(re.search(r"%s time \(seconds\): ([\d.]+)" % kind, result.stderr).group(1))
              for kind in ("User", "System"))  # fmt: skip
    with sqlite3.connect(registry) as conn:
        checksum = conn.execute("SELECT checksum FROM state").fetchone()[0]
    print("%-7s %s: %.1f s wall, %.1f s CPU, peak RSS %d MB; %s" % (name, data.name, elapsed, cpu, rss >> 20,
                                                                   result.stdout.strip()))  # fmt: skip
    return elapsed, cpu, checksum


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("count", type=int, nargs="?", default=1_000_000)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    files = {"ndjson": OUT / ("download-%d.ndjson" % args.count), "xml": OUT / ("download-%d.xml" % args.count)}
    for kind, path in files.items():
        if not path.exists():
            flag = "--download" if kind == "ndjson" else "--xml"
            subprocess.run([sys.executable, str(ROOT / "gen_filings.py"), str(args.count), str(path), flag], check=True)
    ndjson = timed_import(files["ndjson"], "ndjson")
    xml = timed_import(files["xml"], "xml")
    assert ndjson[2] == xml[2], "the two imports differ: %s vs %s" % (ndjson[2], xml[2])
    print("same registry (checksum %s…); XML / NDJSON = %.2f wall, %.2f CPU (goal: at most 1.5)"
          % (xml[2][:16], xml[0] / ndjson[0], xml[1] / ndjson[1]))  # fmt: skip


if __name__ == "__main__":
    main()
