"""Test kit for the admin side: a gate with its admin API on, and readers for its answers."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gatekit import Gate, free_port, gate_config, listener, start_gate, wait_for_port
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "s3cret-admin-token"


@dataclass
class ObservedGate:
    gate: Gate
    http: int
    tls: int
    admin: int
    config: Path

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
        return admin_request(self.admin, path, headers, method)

    def json(self, path: str) -> dict:
        status, _, body = self.get(path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        status, _, body = self.get("/metrics")
        assert status == 200
        return parse_metrics(body.decode())


def start_observed_gate(tmp: Path, backend_http: int, backend_tls: int, *, workers: int = 1,
                        tables: dict[str, dict] | None = None) -> ObservedGate:  # fmt: skip
    """A gate with an HTTP and a TLS listener, the admin API on a free port with a token, a fast
    violation flush and JSON logs; `tables` adds to or overrides those settings."""
    http, tls, admin = free_port(), free_port(), free_port()
    token = tmp / "admin.token"
    token.write_text(TOKEN + "\n")
    settings = {
        "admin": {"enabled": True, "port": admin, "token_file": str(token)},
        "violations": {"flush_interval": 0.2, "sample_client": True},
        "log": {"format": "json"},
        "dns": {"enabled": False},
    }
    for name, values in (tables or {}).items():
        settings[name] = settings.get(name, {}) | values
    listeners = {"http": listener(http, "http", backend_http), "tls": listener(tls, "tls", backend_tls)}
    config = gate_config(tmp, listeners, gate={"workers": workers}, tables=settings)
    gate = start_gate(config, {"http": http, "tls": tls})
    wait_for_port(admin)
    observed = ObservedGate(gate, http, tls, admin, config)
    deadline = time.monotonic() + 20
    while observed.get("/readyz")[0] != 200:
        if time.monotonic() > deadline:
            gate.stop()
            raise TimeoutError("never ready:\n" + gate.log())
        time.sleep(0.1)
    return observed


def admin_request(port: int, path: str, headers: dict[str, str] | None = None,
                  method: str = "GET") -> tuple[int, dict, bytes]:  # fmt: skip
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} from the Prometheus text format."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def by_worker(metrics: dict[tuple[str, tuple], float], name: str) -> dict[str, float]:
    """Each worker's sample of the gauge `name` (labelled `worker`), by worker number."""
    return {dict(labels)["worker"]: value for (sample, labels), value in metrics.items() if sample == name}


def metric(metrics: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(value for (sample, items), value in metrics.items() if sample == name and wanted <= set(items))
