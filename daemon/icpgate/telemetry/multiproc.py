"""prometheus-client's multiprocess directory, set up before prometheus-client is first imported.

prometheus-client picks its value storage when it is imported, from PROMETHEUS_MULTIPROC_DIR; so
`icpgate run` calls `use_metrics_dir` before it imports the gate. Workers, the service process
and the admin API then all write to and read from the same directory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_metrics_dir(configured: Path | None) -> Path:
    """Empty `configured` (counters from an earlier run must not add up) or make a temporary one."""
    if configured is None:
        path = Path(tempfile.mkdtemp(prefix="icpgate-metrics-"))
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    else:
        path = configured
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    os.environ[ENV] = str(path)
    return path
