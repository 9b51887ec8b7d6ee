"""icpgate against nginx, side by side, same domains, same backend, same pinning: `make bench`.

    python bench/run.py [--filings 1000000] [--seconds 5] [--rounds 3]

nginx does the same job the clouds' setups do (docs/performance.md): `map $host` in http{} returning 403,
and `ssl_preread` + `map $ssl_preread_server_name` in stream{}, with every allowed domain in both
maps. Both gates run one worker pinned to CPU 0; the origin (another nginx) and the load
generator (h2load, curl) share CPU 1. Each scenario alternates nginx and icpgate for `rounds`
rounds and reports medians and the icpgate/nginx ratio. Results go to bench/out/results.json.

Beside the rates, each scenario reports each gate's CPU time per request (per MB for the bulk
transfer): user and system time from /proc/PID/stat of the gate's processes (nginx's master and
worker; icpgate's supervisor, worker and service process) over the runs, divided by the requests
the load generator completed. An operator sizes a gate by that, not by a rate the load generator
caps on a small machine. The per-core ratio is nginx's CPU per request over icpgate's: like the
rate ratio, 1.0 is as cheap as nginx and 0.5 twice nginx's cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))

from benchkit import free_port, h2load_rate, stop, wait_port  # noqa: E402
from gen_filings import domain, record  # noqa: E402

GATE_CPU, LOAD_CPU = "0", "1"
FILED = "bench-site-12.cn"  # approved, active access at IDC-EXAMPLE (see gen_filings.py)
BLOCKED = "no-such-site.cn"
PORTS = {
    "origin_http": 18080,
    "origin_tls": 18443,
    "nginx_http": 28080,
    "nginx_tls": 28443,
    "icpgate_http": 38080,
    "icpgate_tls": 38443,
}
BIG_FILE = Path("/dev/shm/icpgate-bench-1g.bin")


def allowed(n: int) -> bool:
    """The generator's records that icpgate's default pack allows: nginx's maps hold these."""
    filing = record(n)
    return (
        filing["status"] == "approved"
        and not filing["limit_access"]
        and filing["access"][0]["status"] in ("active", "first_review")
    )


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=True, **kwargs)


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children."""
    total = 0
    for candidate in [pid, *_children(pid)]:
        for line in Path("/proc/%d/status" % candidate).read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def _children(pid: int) -> list[int]:
    path = Path("/proc/%d/task/%d/children" % (pid, pid))
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    pids, index = [pid], 0
    while index < len(pids):
        pids.extend(_children(pids[index]))
        index += 1
    return pids


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds_split(pids: list[int]) -> dict[int, tuple[float, float]]:
    """User and system CPU time, apart, of each process still alive (bench/cpu_split.py)."""
    times = {}
    for pid in pids:
        try:
            stat = Path("/proc/%d/stat" % pid).read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
        times[pid] = (int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS)  # utime, stime (fields 14, 15)
    return times


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User plus system CPU time of each process still alive, all its threads included."""
    return {pid: user + system for pid, (user, system) in cpu_seconds_split(pids).items()}


def cpu_used(process: subprocess.Popen, work) -> tuple[object, float]:
    """Run `work()`; what it returns and the CPU seconds the process tree of `process` spent meanwhile."""
    pids = _tree(process.pid)
    before = cpu_seconds(pids)
    value = work()
    after = cpu_seconds(pids)
    return value, sum(after[pid] - before[pid] for pid in after if pid in before)


# --- setup ---------------------------------------------------------------------------------------
def allow_time_wait_reuse() -> None:
    """Every scenario opens tens of thousands of connections, two sockets each (client to gate, gate
    to origin): without reusing TIME_WAIT ports for new outgoing connections, loopback runs out."""
    knob = Path("/proc/sys/net/ipv4/tcp_tw_reuse")
    try:
        knob.write_text("1")
    except OSError:
        print("note: cannot set %s=1 (not root?): connection-rate scenarios may run out of ports" % knob)


def prepare(filings: int, work: Path) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    allow_time_wait_reuse()
    data = OUT / ("filings-%d.ndjson" % filings)
    if not data.exists():
        run([sys.executable, str(HERE / "gen_filings.py"), str(filings), str(data)])
    config = work / "icpgate.toml"
    registry = OUT / ("registry-%d.db" % filings)
    config.write_text(
        '[provider]\nid = "IDC-EXAMPLE"\n[registry]\npath = "%s"\nreload_interval = 0\n[policy]\npack = "%s"\n'
        "[gate]\nworkers = 1\nmax_connections = 20000\n"
        "[admin]\nport = %d\n[dns]\nenabled = false\n"  # the admin API as in production; no DNS off this machine
        '[[listeners]]\naddress = "127.0.0.1"\nport = %d\nkind = "http"\nbackend = "127.0.0.1:%d"\n'
        '[[listeners]]\naddress = "127.0.0.1"\nport = %d\nkind = "tls"\nbackend = "127.0.0.1:%d"\n'
        % (
            registry,
            REPO / "policies" / "default.toml",
            free_port(),
            PORTS["icpgate_http"],
            PORTS["origin_http"],
            PORTS["icpgate_tls"],
            PORTS["origin_tls"],
        )
    )
    if not registry.exists():
        print("importing %d filings into %s ..." % (filings, registry), flush=True)
        started = time.monotonic()
        run([sys.executable, "-m", "icpgate", "import", str(data), "-c", str(config)])
        print("  import took %.1f s" % (time.monotonic() - started), flush=True)
    maps = work / "allowed.map"
    with maps.open("w") as out:
        for n in range(filings):
            if allowed(n):
                out.write(".%s 1;\n" % domain(n))
    cert, key = work / "origin.pem", work / "origin.key"
    run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=%s" % FILED,
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ]
    )
    if not BIG_FILE.exists() or BIG_FILE.stat().st_size != 1 << 30:
        with BIG_FILE.open("wb") as big:
            for _ in range(1024):
                big.write(os.urandom(1 << 20))
    return {"config": config, "maps": maps, "cert": cert, "key": key, "work": work}


def nginx_conf(path: Path, body: str) -> Path:
    prefix = path.parent / (path.stem + ".d")
    prefix.mkdir(exist_ok=True)
    path.write_text(
        "daemon off; worker_processes 1; pid %s/nginx.pid; error_log %s/error.log error;\n"
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
        "worker_rlimit_nofile 65536; events { worker_connections 20000; }\n%s"
        % (prefix, prefix, body.replace("TEMP", str(prefix)))
    )
    return path


def start_origin(setup: dict[str, Path]) -> subprocess.Popen:
    conf = nginx_conf(
        setup["work"] / "origin.conf",
        (
            "http { access_log off; client_body_temp_path TEMP; proxy_temp_path TEMP; keepalive_requests 1000000;\n"
            " server { listen 127.0.0.1:%d; listen 127.0.0.1:%d ssl; ssl_certificate %s; ssl_certificate_key %s;\n"
            "  location = /big { alias %s; default_type application/octet-stream; }\n"
            '  location / { default_type text/plain; return 200 "ok\\n"; } } }\n'
            % (PORTS["origin_http"], PORTS["origin_tls"], setup["cert"], setup["key"], BIG_FILE)
        ),
    )
    process = subprocess.Popen(["taskset", "-c", LOAD_CPU, "/usr/sbin/nginx", "-c", str(conf)])
    wait_port(PORTS["origin_tls"])
    return process


def start_nginx_gate(setup: dict[str, Path]) -> tuple[subprocess.Popen, float]:
    maps = setup["maps"]
    conf = nginx_conf(
        setup["work"] / "nginx-gate.conf",
        (
            "http { access_log off; client_body_temp_path TEMP; proxy_temp_path TEMP; keepalive_requests 1000000;\n"
            " map_hash_max_size 4194304; map_hash_bucket_size 256; server_names_hash_bucket_size 128;\n"
            " map $host $icp_allowed { hostnames; default 0; include %s; }\n"
            " upstream origin { server 127.0.0.1:%d; keepalive 128; }\n"
            ' server { listen 127.0.0.1:%d; if ($icp_allowed = 0) { return 403 "blocked\\n"; }\n'
            '  location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; } } }\n'
            "stream { map_hash_max_size 4194304; map_hash_bucket_size 256;\n"
            " map $ssl_preread_server_name $icp_backend { hostnames; default 127.0.0.1:9; include %s; }\n"
            " server { listen 127.0.0.1:%d; ssl_preread on; proxy_pass $icp_backend; } }\n"
            % (maps, PORTS["origin_http"], PORTS["nginx_http"], setup["work"] / "backend.map", PORTS["nginx_tls"])
        ),
    )
    backend_map = setup["work"] / "backend.map"
    if not backend_map.exists():
        with maps.open() as source, backend_map.open("w") as out:
            for line in source:
                out.write(line.replace(" 1;", " 127.0.0.1:%d;" % PORTS["origin_tls"]))
    started = time.monotonic()
    process = subprocess.Popen(["taskset", "-c", GATE_CPU, "/usr/sbin/nginx", "-c", str(conf)])
    wait_port(PORTS["nginx_tls"])
    return process, time.monotonic() - started


def start_icpgate(setup: dict[str, Path]) -> tuple[subprocess.Popen, float]:
    started = time.monotonic()
    process = subprocess.Popen(
        [
            "taskset",
            "-c",
            GATE_CPU,
            sys.executable,
            "-m",
            "icpgate",
            "run",
            "-c",
            str(setup["config"]),
            "--log-level",
            "warning",
        ]
    )
    wait_port(PORTS["icpgate_tls"])
    return process, time.monotonic() - started


# --- scenarios -------------------------------------------------------------------------------------
def h2load(url: str, port: int, seconds: int, *extra: str, log: Path | None = None) -> tuple[float, int]:
    """Requests per second over about `seconds`, and how many requests were made in all. A short
    run sizes the real one: h2load's -D mode hangs when the server closes connections, so the
    request count (-n) bounds every run."""
    calibration = _h2load(url, port, 2000, extra, None)
    requests = max(2000, int(calibration * seconds))
    return _h2load(url, port, requests, extra, log), 2000 + requests


def _h2load(url: str, port: int, requests: int, extra: tuple[str, ...], log: Path | None) -> float:
    command = [
        "taskset",
        "-c",
        LOAD_CPU,
        "h2load",
        "--h1",
        "-n",
        str(requests),
        "--connect-to=127.0.0.1:%d" % port,
        *extra,
    ]
    if log:
        command.append("--log-file=%s" % log)
    return h2load_rate(command, url, requests)


def bulk_mbps(port: int) -> tuple[float, int]:
    """MB/s of one download of BIG_FILE, and its size in MB."""
    result = run(
        [
            "taskset",
            "-c",
            LOAD_CPU,
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{speed_download}",
            "--resolve",
            "%s:%d:127.0.0.1" % (FILED, port),
            "https://%s:%d/big" % (FILED, port),
        ]
    )
    return float(result.stdout) / 1e6, BIG_FILE.stat().st_size // 1_000_000


def latency(port: int, scheme: str, rate: int, seconds: float, log: Path) -> tuple[float, float]:
    clients = 20
    log.unlink(missing_ok=True)
    h2load(
        "%s://%s/" % (scheme, FILED), port, seconds, "-c", str(clients), "--rps", str(max(1, rate // clients)), log=log
    )
    durations = sorted(int(line.split()[2]) for line in log.read_text().splitlines() if line.strip())
    return durations[len(durations) // 2] / 1000, durations[int(len(durations) * 0.99)] / 1000


def scenarios(seconds: float, work: Path):
    """(name, unit, function(gate) -> (value, requests or MB done)); gate is "nginx" or "icpgate"."""

    def port(gate: str, kind: str) -> int:
        return PORTS["%s_%s" % (gate, kind)]

    return [
        (
            "blocked HTTP, new connection per request",
            "req/s",
            lambda g: h2load("http://%s/" % BLOCKED, port(g, "http"), seconds, "-c", "50", "-H", "Connection: close"),
        ),
        (
            "keep-alive HTTP relayed, per-request check",
            "req/s",
            lambda g: h2load("http://%s/" % FILED, port(g, "http"), seconds, "-c", "50"),
        ),
        (
            "TLS keep-alive through pass-through",
            "req/s",
            lambda g: h2load("https://%s/" % FILED, port(g, "tls"), seconds, "-c", "50"),
        ),
        (
            "new TLS connections (one request each)",
            "conn/s",
            lambda g: h2load("https://%s/" % FILED, port(g, "tls"), seconds, "-c", "50", "-H", "Connection: close"),
        ),
        ("bulk TLS transfer through pass-through", "MB/s", lambda g: bulk_mbps(port(g, "tls"))),
    ]


def measure_all(args, work: Path, nginx, icpgate, nginx_start: float, icpgate_start: float) -> dict[str, object]:
    results: dict[str, object] = {}
    results["startup_s"] = {"nginx": round(nginx_start, 1), "icpgate": round(icpgate_start, 1)}
    results["rss_mb"] = {"nginx": round(rss_mb(nginx.pid)), "icpgate": round(rss_mb(icpgate.pid))}
    print(
        "start-up: nginx %.1f s, icpgate %.1f s; resident: nginx %d MB, icpgate %d MB"
        % (nginx_start, icpgate_start, results["rss_mb"]["nginx"], results["rss_mb"]["icpgate"]),
        flush=True,
    )
    table = []
    processes = {"nginx": nginx, "icpgate": icpgate}
    for name, unit, measure in scenarios(args.seconds, work):
        samples: dict[str, list[float]] = {"nginx": [], "icpgate": []}
        cpu: dict[str, list[float]] = {"nginx": [], "icpgate": []}  # µs per request (per MB in bulk)
        for _ in range(args.rounds):
            for gate in ("nginx", "icpgate"):
                try:
                    (value, done), seconds = cpu_used(processes[gate], lambda: measure(gate))  # noqa: B023
                except RuntimeError as error:  # recorded, not fatal: the other scenarios still run
                    print("%s, %s: %s" % (name, gate, str(error).splitlines()[0]), flush=True)
                    continue
                samples[gate].append(value)
                cpu[gate].append(seconds / done * 1e6)
        if not samples["nginx"] or not samples["icpgate"]:
            table.append({"scenario": name, "unit": unit, "error": "no complete run", "samples": samples})
            continue
        medians = {gate: statistics.median(values) for gate, values in samples.items()}
        cpu_medians = {gate: statistics.median(values) for gate, values in cpu.items()}
        per = "MB" if unit == "MB/s" else "req"
        row = {
            "scenario": name,
            "unit": unit,
            **{g: round(v, 1) for g, v in medians.items()},
            "ratio": round(medians["icpgate"] / medians["nginx"], 2),
            "cpu_us_per_%s" % per: {g: round(v, 1) for g, v in cpu_medians.items()},
            "per_core_ratio": round(cpu_medians["nginx"] / cpu_medians["icpgate"], 2),
            "samples": samples,
            "cpu_samples": cpu,
        }
        table.append(row)
        print(
            "%-45s nginx %10.1f  icpgate %10.1f %-7s ratio %.2f | CPU µs/%s nginx %6.1f  icpgate %6.1f  per core %.2f"
            % (name, medians["nginx"], medians["icpgate"], unit, row["ratio"], per, cpu_medians["nginx"],
               cpu_medians["icpgate"], row["per_core_ratio"]),
            flush=True,
        )  # fmt: skip
    keepalive = next(r for r in table if r["scenario"].startswith("keep-alive") and "ratio" in r)
    rate = int(min(keepalive["nginx"], keepalive["icpgate"]) / 2)
    lat = {}
    for label, port in (
        ("direct", PORTS["origin_http"]),
        ("nginx", PORTS["nginx_http"]),
        ("icpgate", PORTS["icpgate_http"]),
    ):
        lat[label] = latency(port, "http", rate, args.seconds, work / ("latency-%s.log" % label))
    added = {
        "p50": {g: round(lat[g][0] - lat["direct"][0], 3) for g in ("nginx", "icpgate")},
        "p99": {g: round(lat[g][1] - lat["direct"][1], 3) for g in ("nginx", "icpgate")},
    }
    measured = {label: {"p50": p50, "p99": p99} for label, (p50, p99) in lat.items()}
    results["latency_ms_at_half_load"] = {"rate": rate, **measured, "added": added}
    print("latency at %d req/s (half load), ms: %s" % (rate, json.dumps(results["latency_ms_at_half_load"])))
    results["scenarios"] = table
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--filings", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for tool in ("h2load", "curl", "openssl", "taskset"):
        if not shutil.which(tool):
            sys.exit("%s is missing: run `make system-deps`" % tool)
    work = OUT / "run"
    shutil.rmtree(work, ignore_errors=True)
    setup = prepare(args.filings, work)
    origin = start_origin(setup)
    results: dict[str, object] = {"filings": args.filings, "seconds": args.seconds, "rounds": args.rounds}
    gates: list[subprocess.Popen] = []
    try:
        nginx, nginx_start = start_nginx_gate(setup)
        gates.append(nginx)
        icpgate, icpgate_start = start_icpgate(setup)
        gates.append(icpgate)
        results.update(measure_all(args, work, nginx, icpgate, nginx_start, icpgate_start))
    finally:
        for process in [*gates, origin]:
            stop(process)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print("wrote %s" % (OUT / "results.json"))


if __name__ == "__main__":
    main()
