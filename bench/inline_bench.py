"""Transparent mode against a static backend, same traffic, same gate code: issue 12's `make bench` rows.

    python bench/inline_bench.py [--seconds 5] [--rounds 5]

Three network namespaces from tests/netnskit.py: a client, a gate (the router, with the shipped
systemd/icpgate-inline.nft and its policy routing loaded) and a server (nginx, the customer's server
on a hosted IP). In the gate namespace, two icpgate processes, each one worker pinned to CPU 0 as
in bench/run.py, only one of them loaded at a time:
- transparent: the ruleset's TPROXY steers the client's connections to the hosted IP (ports 80 and
  443) to `transparent` listeners, and the gate connects on from the client's own address
  (upstream.source = "client"), so the server sees the client;
- static: the client dials the gate's own address; plain listeners with `backend` = the same
  hosted IP and ports, source = gate: what the gate did before inline mode.
(Two processes because upstream.source is a daemon-wide setting.) The load generators (h2load,
curl) and nginx share CPU 1. A check first proves which address the server sees on each path.

Rows: keep-alive HTTP and TLS keep-alive (req/s), a new HTTP connection per request (where the
transparent upstream's bind-and-connect shows), one 1 GiB TLS download (MB/s). Each alternates the
two paths for `rounds` rounds and reports the medians, their ratio transparent/static (goal >= 0.9),
the median of the per-round ratios, and the gate process's CPU time per request (per MB): rates
swing with the other work on a shared machine, CPU per request much less. Latency at a fixed rate
is measured through both paths and to the hosted IP routed past the gate (the ruleset's bypass
set). Results go to bench/out/inline.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import netnskit  # noqa: E402
from benchkit import ICPGATE, h2load_rate, write_config  # noqa: E402
from netnskit import CLIENT4, GATE_CLIENT_SIDE4, GATE_SERVER_SIDE4, SERVER4, Topology  # noqa: E402
from run import BIG_FILE, FILED, GATE_CPU, LOAD_CPU, OUT, nginx_conf  # noqa: E402

MODES = ("transparent", "static")
HOSTED_PORTS = {"http": 80, "tls": 443}  # nginx on the hosted IP
TPROXY_PORTS = {"http": 8080, "tls": 8443}  # the transparent listeners: the ruleset's HTTP_LISTENER, TLS_LISTENER
STATIC_PORTS = {"http": 9080, "tls": 9443}  # the plain listeners, on the gate's own address
# What each path's upstream connections come from, as the server sees it.
SEEN_SOURCE = {"transparent": CLIENT4, "static": GATE_SERVER_SIDE4}
FILINGS = 100  # a few filed domains: this measures the path, not the index (bench/run.py does that)
Endpoints = dict[str, dict[str, tuple[str, int]]]  # mode -> kind -> (address, port) the client dials
ENDPOINTS: Endpoints = {
    "transparent": {kind: (SERVER4, port) for kind, port in HOSTED_PORTS.items()},
    "static": {kind: (GATE_CLIENT_SIDE4, port) for kind, port in STATIC_PORTS.items()},
}


def sh(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=True)


class Load:
    """The load generators, run in the client namespace on the load CPU."""

    def __init__(self, namespace: str) -> None:
        self.prefix = ["ip", "netns", "exec", namespace, "taskset", "-c", LOAD_CPU]

    def rate(self, url: str, address: str, port: int, seconds: float, *extra: str,
             log: Path | None = None) -> tuple[float, int]:  # fmt: skip
        """Requests per second over about `seconds`, and how many requests were made in all. A short
        run sizes the real one (h2load's -D mode hangs when the server closes connections, so the
        request count bounds every run, as in bench/run.py)."""
        calibration = self._h2load(url, address, port, 2000, extra, None)
        requests = max(2000, int(calibration * seconds))
        return self._h2load(url, address, port, requests, extra, log), 2000 + requests

    def _h2load(self, url: str, address: str, port: int, requests: int, extra: tuple[str, ...],
                log: Path | None) -> float:  # fmt: skip
        command = [*self.prefix, "h2load", "--h1", "-n", str(requests), "--connect-to=%s:%d" % (address, port), *extra]
        if log:
            command.append("--log-file=%s" % log)
        return h2load_rate(command, url, requests)

    def get(self, kind: str, address: str, port: int, path: str) -> str:
        """The body of one GET (check_sources asks who the server saw)."""
        url = "%s://%s:%d%s" % ("https" if kind == "tls" else "http", FILED, port, path)
        resolve = "%s:%d:%s" % (FILED, port, address)
        return sh(*self.prefix, "curl", "-sSfk", "--max-time", "30", "--resolve", resolve, url).stdout

    def bulk_mbps(self, address: str, port: int) -> tuple[float, float]:
        """MB/s of one download of the 1 GiB file over TLS (the origin's TLS, passed through), and its MB."""
        url = "https://%s:%d/big" % (FILED, port)
        fetch = [*self.prefix, "curl", "-sSfk", "-o", "/dev/null", "-w", "%{speed_download}", "--max-time", "120"]
        speed = float(sh(*fetch, "--resolve", "%s:%d:%s" % (FILED, port, address), url).stdout) / 1e6
        return speed, BIG_FILE.stat().st_size / 1e6

    def latency(self, address: str, port: int, rate: int, seconds: float, log: Path) -> tuple[float, float]:
        """p50 and p99 in ms of keep-alive HTTP requests at a fixed `rate` (20 clients, h2load --rps)."""
        clients = 20
        log.unlink(missing_ok=True)
        self.rate("http://%s/" % FILED, address, port, seconds, "-c", str(clients), "--rps",
                  str(max(1, rate // clients)), log=log)  # fmt: skip
        durations = sorted(int(line.split()[2]) for line in log.read_text().splitlines() if line.strip())
        return durations[len(durations) // 2] / 1000, durations[int(len(durations) * 0.99)] / 1000


# --- setup ---------------------------------------------------------------------------------------
def prepare(work: Path) -> dict[str, Path]:
    """A registry of a few filings (FILED among them), one gate config per mode sharing it, the
    origin's certificate, and the 1 GiB file bench/run.py also serves."""
    data = work / "filings.ndjson"
    sh(sys.executable, str(HERE / "gen_filings.py"), str(FILINGS), str(data))
    sh(*ICPGATE, "import", str(data), "-c", str(write_config(work)))
    configs = {mode: gate_config(work, mode) for mode in MODES}
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=%s" % FILED,
       "-keyout", str(work / "origin.key"), "-out", str(work / "origin.pem"))  # fmt: skip
    if not BIG_FILE.exists() or BIG_FILE.stat().st_size != 1 << 30:
        with BIG_FILE.open("wb") as big:
            for _ in range(1024):
                big.write(os.urandom(1 << 20))
    return configs


def gate_config(work: Path, mode: str) -> Path:
    """transparent: TPROXY listeners, source = client. static: plain listeners, backend = the hosted IP."""
    if mode == "transparent":
        source = "client"
        listeners = [listener("0.0.0.0", TPROXY_PORTS[kind], kind, "transparent = true") for kind in HOSTED_PORTS]
    else:
        source = "gate"
        listeners = [listener(GATE_CLIENT_SIDE4, STATIC_PORTS[kind], kind, 'backend = "%s:%d"' % (SERVER4, port))
                     for kind, port in HOSTED_PORTS.items()]  # fmt: skip
    body = '[gate]\nworkers = 1\nmax_connections = 5000\n[upstream]\nmode = "original_dst"\nsource = "%s"\n' % source
    return write_config(work, body + "".join(listeners)).rename(work / ("%s.toml" % mode))


def listener(address: str, port: int, kind: str, extra: str) -> str:
    return '[[listeners]]\naddress = "%s"\nport = %d\nkind = "%s"\n%s\n' % (address, port, kind, extra)


def start_origin(net: Topology, work: Path) -> None:
    """nginx as the customer's server: a short answer, the 1 GiB file, and whom it saw (/whoami)."""
    conf = nginx_conf(
        work / "origin.conf",
        "http { access_log off; client_body_temp_path TEMP; proxy_temp_path TEMP; keepalive_requests 1000000;\n"
        " server { listen %s:80; listen %s:443 ssl; ssl_certificate %s; ssl_certificate_key %s;\n"
        "  location = /big { alias %s; default_type application/octet-stream; }\n"
        '  location = /whoami { default_type text/plain; return 200 "$remote_addr"; }\n'
        '  location / { default_type text/plain; return 200 "ok\\n"; } } }\n'
        % (SERVER4, SERVER4, work / "origin.pem", work / "origin.key", BIG_FILE),
    )
    process = net.popen(net.server, ["taskset", "-c", LOAD_CPU, netnskit.NGINX, "-c", str(conf)])
    for port in HOSTED_PORTS.values():
        net.wait_for_port(net.server, SERVER4, port, process=process)


def start_gates(net: Topology, work: Path, configs: dict[str, Path]) -> dict[str, int]:
    """One gate process per mode (one worker, pinned); their process ids."""
    pids = {}
    for mode, ports in (("transparent", TPROXY_PORTS), ("static", STATIC_PORTS)):
        log = (work / ("gate-%s.log" % mode)).open("w")
        process = net.popen(net.gate, ["taskset", "-c", GATE_CPU, *ICPGATE, "run", "-c", str(configs[mode]),
                                       "--log-level", "warning"], stdout=log, stderr=log)  # fmt: skip
        for port in ports.values():
            net.wait_for_port(net.gate, "127.0.0.1" if mode == "transparent" else GATE_CLIENT_SIDE4, port,
                              process=process)  # fmt: skip
        pids[mode] = process.pid
    return pids


def allow_time_wait_reuse(net: Topology) -> None:
    """As bench/run.py does on loopback: h2load closes first, so each connection leaves its port in
    TIME_WAIT in the client namespace, and the connection-rate scenario runs through the port range
    in seconds; without reuse, connect() then searches an exhausted range and the rate collapses
    (to ~150/s even without the gate). The setting is per namespace; the gate's own connections too."""
    for namespace in (net.client, net.gate):
        net.run(namespace, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")


@contextlib.contextmanager
def bypassed(net: Topology) -> Iterator[None]:
    """The hosted range in the ruleset's bypass set: routed by the gate namespace, not proxied."""
    element = ["inet", "icpgate", "bypass4", "{ %s }" % netnskit.HOSTED4]
    net.run(net.gate, "nft", "add", "element", *element)
    try:
        yield
    finally:
        net.run(net.gate, "nft", "delete", "element", *element)


# --- measurement ---------------------------------------------------------------------------------
def check_sources(load: Load) -> None:
    """Both paths relay, and only the transparent one shows the server the client's own address:
    otherwise the rows would not compare what they say."""
    for mode, kinds in ENDPOINTS.items():
        for kind, (address, port) in kinds.items():
            seen = load.get(kind, address, port, "/whoami")
            if seen != SEEN_SOURCE[mode]:
                raise RuntimeError("%s %s: the server saw %r, not %s" % (mode, kind, seen, SEEN_SOURCE[mode]))


Scenario = tuple[str, str, str, Callable[[str], tuple[float, float]]]


def scenarios(load: Load, seconds: float) -> list[Scenario]:
    """(name, unit, unit of work, function(mode) -> (figure, work done))."""

    def requests(mode: str, kind: str, *extra: str) -> tuple[float, float]:
        url = "%s://%s/" % ("https" if kind == "tls" else "http", FILED)
        return load.rate(url, *ENDPOINTS[mode][kind], seconds, "-c", "50", *extra)

    return [
        ("keep-alive HTTP relayed, per-request check", "req/s", "request", lambda mode: requests(mode, "http")),
        ("new HTTP connection per request", "req/s", "request",
         lambda mode: requests(mode, "http", "-H", "Connection: close")),
        ("TLS keep-alive through pass-through", "req/s", "request", lambda mode: requests(mode, "tls")),
        ("bulk TLS transfer (1 GiB) through pass-through", "MB/s", "MB",
         lambda mode: load.bulk_mbps(*ENDPOINTS[mode]["tls"])),
    ]  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User and system time of a process so far (/proc/PID/stat utime + stime)."""
    fields = Path("/proc/%d/stat" % pid).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args: argparse.Namespace, load: Load, gates: dict[str, int]) -> list[dict[str, object]]:
    """Each scenario `rounds` times, alternating the modes. Beside the figure, the gate process's CPU
    time per unit of work: on a shared machine it moves less than a rate does, and at saturation of
    the gate's core the rates would stand in its inverse ratio."""
    table: list[dict[str, object]] = []
    for name, unit, work_unit, run_once in scenarios(load, args.seconds):
        samples: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}  # microseconds per unit of work
        paired: list[float] = []  # transparent/static within a round where both completed
        for _ in range(args.rounds):
            this_round = {}
            for mode in MODES:
                before = cpu_seconds(gates[mode])
                try:
                    figure, work = run_once(mode)
                except (RuntimeError, subprocess.SubprocessError) as error:  # recorded: the other scenarios still run
                    print("%s, %s: %s" % (name, mode, str(error).splitlines()[0]), flush=True)
                    continue
                samples[mode].append(figure)
                cpu[mode].append((cpu_seconds(gates[mode]) - before) / work * 1e6)
                this_round[mode] = figure
            if len(this_round) == len(MODES):
                paired.append(this_round["transparent"] / this_round["static"])
        if not paired:
            table.append({"scenario": name, "unit": unit, "error": "no complete run", "samples": samples})
            continue
        medians = {mode: statistics.median(values) for mode, values in samples.items()}
        costs = {mode: statistics.median(values) for mode, values in cpu.items()}
        row = {
            "scenario": name,
            "unit": unit,
            **{mode: round(value, 1) for mode, value in medians.items()},
            "ratio": round(medians["transparent"] / medians["static"], 2),
            "ratio_per_round": round(statistics.median(paired), 2),
            "gate_cpu_us_per_%s" % work_unit: {mode: round(value, 2) for mode, value in costs.items()},
            "ratio_by_gate_cpu": round(costs["static"] / costs["transparent"], 2),
            "samples": samples,
            "gate_cpu_samples": cpu,
            "load_average": os.getloadavg()[0],  # the machine's, as the scenario ended: others' work shows here
        }
        table.append(row)
        print(
            "%-47s static %9.1f  transparent %9.1f %-6s ratio %.2f (per round %.2f)"
            % (name, medians["static"], medians["transparent"], unit, row["ratio"], row["ratio_per_round"])
        )
        print("%-47s static %9.1f  transparent %9.1f us/%-3s ratio %.2f"
              % ("  gate CPU per " + work_unit, costs["static"], costs["transparent"], work_unit[:3],
                 row["ratio_by_gate_cpu"]), flush=True)  # fmt: skip
    return table


def latencies(args: argparse.Namespace, net: Topology, load: Load, rate: int) -> dict[str, object]:
    """p50/p99 at `rate` through each path, and to the hosted IP routed past the gate."""
    targets = {mode: ENDPOINTS[mode]["http"] for mode in MODES} | {"direct": (SERVER4, HOSTED_PORTS["http"])}
    measured = {}
    for label, (address, port) in targets.items():
        with bypassed(net) if label == "direct" else contextlib.nullcontext():
            measured[label] = load.latency(address, port, rate, args.seconds, args.work / ("latency-%s.log" % label))
    result: dict[str, object] = {"rate": rate}
    result.update({label: {"p50": p50, "p99": p99} for label, (p50, p99) in measured.items()})
    result["added"] = {q: {mode: round(measured[mode][i] - measured["direct"][i], 3) for mode in MODES}
                       for i, q in enumerate(("p50", "p99"))}  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)  # more than run.py: the paths differ by less than the noise
    args = parser.parse_args()
    for tool in ("h2load", "curl", "openssl", "taskset", "nft", "ip"):
        if not shutil.which(tool):
            sys.exit("%s is missing: run `make system-deps`" % tool)
    args.work = OUT / "inline"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    configs = prepare(args.work)
    results: dict[str, object] = {"seconds": args.seconds, "rounds": args.rounds}
    with netnskit.topology("icpb") as net:
        net.load_ruleset({"HTTP_LISTENER": str(TPROXY_PORTS["http"]), "TLS_LISTENER": str(TPROXY_PORTS["tls"])})
        allow_time_wait_reuse(net)
        start_origin(net, args.work)
        gates = start_gates(net, args.work, configs)
        load = Load(net.client)
        check_sources(load)
        results["scenarios"] = table = measure(args, load, gates)
        keepalive = [row for row in table if row["scenario"].startswith("keep-alive") and "ratio" in row]
        if keepalive:  # else no rate to halve: the errors above say why
            rate = int(min(keepalive[0]["static"], keepalive[0]["transparent"]) / 2)
            results["latency_ms_at_half_load"] = latency = latencies(args, net, load, rate)
            print("latency at %d req/s (half load), ms: %s" % (rate, json.dumps(latency)), flush=True)
    (OUT / "inline.json").write_text(json.dumps(results, indent=2))
    print("wrote %s" % (OUT / "inline.json"))


if __name__ == "__main__":
    main()
