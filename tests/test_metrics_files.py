"""The admin reads the workers' metrics files while workers start and stop: a file a starting
worker has created but not yet sized must not turn /metrics and /readyz into a 500."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def test_an_empty_metrics_file_of_a_starting_worker_is_skipped(tmp_path: Path) -> None:
    # A real worker process writes its file through prometheus-client's multiprocess mode.
    script = textwrap.dedent("""
        from prometheus_client import Counter
        Counter("icpgate_test_events", "test", ["kind"]).labels("http").inc(3)
    """)
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    (tmp_path / "counter_99999.db").touch()  # created, not yet sized, as a worker at start-up leaves it
    reader = textwrap.dedent("""
        from icpgate.admin.state_metrics import worker_families
        families = {family.name: family for family in worker_families()}
        print(sum(sample.value for sample in families["icpgate_test_events"].samples))
    """)
    result = subprocess.run([sys.executable, "-c", reader], env={**env, "PYTHONPATH": str(Path(__file__).parents[1]
                            / "daemon")}, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "3.0"
