"""The image: `make image` builds it from the Dockerfile, and it runs as docs/deployment.md says.

It is built on a base made from Debian's own packages (tests/debian-base.sh), since these
machines reach Debian's mirror and PyPI but no registry of images; podman keeps that base in its
storage, so only a machine's first run makes it. The project and its dependencies come from PyPI
inside the build. Then podman runs the image's entry point in a network namespace the test creates:
the gate, on the config the image ships, relays a filed site to an origin in the same namespace and
answers an unfiled one with the block page, as the unprivileged user with no capability; and the
guide's transparent-mode command gives the gate CAP_NET_ADMIN and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_deploy_inline import transparent_command

from conftest import REPO, SAMPLES

TAG = "localhost/icpgate:test-" + hashlib.sha256(str(REPO).encode()).hexdigest()[:8]  # one per checkout
# podman run as these machines need it: runc, since crun refuses a host with cgroups v1 or hybrid, and
# limits no higher than the machine's own, since root here may not raise them (no CAP_SYS_RESOURCE).
# Neither changes what runs; docs/deployment.md ("The image") says when an operator needs them.
PODMAN_RUN = ["podman", "--runtime", "runc", "run", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
CAP_SETGID, CAP_SETUID, CAP_NET_ADMIN = 1 << 6, 1 << 7, 1 << 12
MAX_SIZE = 400_000_000  # bytes: the venv and a minimal Debian, no wheels or compilers left behind

pytestmark = pytest.mark.timeout(900)  # the first test using `image` waits for a cold build


def podman(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *argv], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError("podman %s: exit %d: %s" % (" ".join(argv), result.returncode, result.stderr.strip()))
    return result


def image_id(name: str) -> str | None:
    result = podman("image", "inspect", "--format", "{{.Id}}", name, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.fixture(scope="module")
def image() -> str:
    """`make image` on the Debian base; the image this replaces is removed, its layers stay cached."""
    started = time.monotonic()
    base = subprocess.run(["make", "--no-print-directory", "debian-base"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert base.returncode == 0 and base.stdout.strip().startswith("localhost/icpgate-base:"), base.stderr
    based = time.monotonic()
    before = image_id(TAG)
    build = subprocess.run(["make", "image", "BASE=" + base.stdout.strip(), "IMAGE=" + TAG], cwd=REPO,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    after = image_id(TAG)
    if before and before != after:
        podman("rmi", before, check=False)  # fails, and is left, while a container uses it
    print("image %s: base %.1f s, build %.1f s" % (TAG, based - started, time.monotonic() - based))
    return TAG


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    """A network namespace of our own with its loopback up: the containers and the origin share it."""
    name = "icpgimg-" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def volume() -> Iterator[str]:
    name = "icpgimg-" + secrets.token_hex(3)
    podman("volume", "create", name)
    try:
        yield name
    finally:
        podman("volume", "rm", "--force", name, check=False)


@contextlib.contextmanager
def origin(netns: str, tmp_path: Path) -> Iterator[None]:
    """The backend of the image's config (127.0.0.1:9080), in the namespace: it echoes the host."""
    log = (tmp_path / "origin.log").open("w")
    process = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, str(REPO / "tests" / "origin.py"),
                                "--http", "9080"], stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    try:
        assert json.loads(process.stdout.readline()) == {"ready": True}
        yield
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def container(argv: list[str]) -> Iterator[str]:
    """`podman run -d` with these arguments; stopped (SIGTERM) and removed on leaving."""
    name = "icpgimg-" + secrets.token_hex(3)
    started = subprocess.run([*PODMAN_RUN, "-d", "--name", name, *argv], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        yield name
    finally:
        podman("stop", "--time", "30", name, check=False)
        podman("rm", "--force", name, check=False)


def import_samples(netns: str, state: str) -> None:
    """The guide's import: a one-off container on the state volume, with the image's config."""
    result = subprocess.run([*PODMAN_RUN, "--rm", "--network", "ns:/run/netns/" + netns,
                             "-v", state + ":/var/lib/icpgate", "-v", "%s:/data/f.ndjson:ro" % SAMPLES,
                             TAG, "import", "/data/f.ndjson", "-c", "/etc/icpgate/config.toml"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and "imported 43 filings" in result.stdout, result.stdout + result.stderr


def installed_config() -> str:
    """The config the image installs: the example with the registry in the volume (the Dockerfile's sed)."""
    text = (REPO / "config.example.toml").read_text()
    assert '\npath = "var/registry.db"\n' in text
    return text.replace('\npath = "var/registry.db"\n', '\npath = "/var/lib/icpgate/registry.db"\n')


def curl(netns: str, url: str, host: str | None = None) -> tuple[int, str]:
    """(status, body) of a GET from inside the namespace; status 0 when nothing answered."""
    headers = ["-H", "Host: " + host] if host else []
    result = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "--max-time", "10", "-w", "\n%{http_code}",
                             *headers, url], capture_output=True, text=True)  # fmt: skip
    body, _, status = result.stdout.rpartition("\n")
    return int(status or 0), body


def wait_ready(netns: str, name: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while curl(netns, "http://127.0.0.1:9180/readyz")[0] != 200:
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running" and time.monotonic() < deadline, state + podman("logs", name).stderr[-3000:]
        time.sleep(0.5)


def process_status(name: str) -> list[dict[str, str]]:
    """/proc/PID/status of the container's first process and of its children (the workers)."""
    pid = podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    children = Path("/proc/%s/task/%s/children" % (pid, pid)).read_text().split()
    statuses = []
    for each in [pid, *children]:
        lines = Path("/proc/%s/status" % each).read_text().splitlines()
        statuses.append(dict(line.split(":\t", 1) for line in lines if ":\t" in line))
    return statuses


def caps(status: dict[str, str], key: str) -> int:
    return int(status[key], 16)


def guide_transparent_run(netns: str, state: str, config: Path) -> list[str]:
    """docs/deployment.md's transparent-mode `docker run`, for podman here: the test's namespace for the
    host's network, its volume and config file for the guide's, this image for `icpgate`; the
    rest (user, capabilities, setpriv and its arguments, the command) as the guide has it."""
    command = transparent_command()
    assert command[:2] == ["docker", "run"]
    words = iter(command[2:])
    argv = [word for word in words if word != "-d" and not (word == "--name" and next(words))]
    for i, word in enumerate(argv[:-1]):
        value = argv[i + 1]
        if word == "--network":
            argv[i + 1] = "ns:/run/netns/" + netns
        elif word == "-v" and value.startswith("icpgate-state:"):
            argv[i + 1] = value.replace("icpgate-state", state, 1)
        elif word == "-v" and value.endswith(":/etc/icpgate/config.toml:ro"):
            argv[i + 1] = "%s:/etc/icpgate/config.toml:ro" % config
    image = argv.index("--entrypoint") + 2
    assert argv[image] == "icpgate"
    argv[image] = TAG
    return argv


def test_the_image_holds_what_the_guide_says(image: str) -> None:
    (inspected,) = json.loads(podman("image", "inspect", image).stdout)
    config = inspected["Config"]
    assert config["User"] == "icpgate" and config["Entrypoint"] == ["icpgate"]
    assert config["Cmd"] == ["run", "-c", "/etc/icpgate/config.toml"]
    assert list(config["Volumes"]) == ["/var/lib/icpgate"] and set(config["ExposedPorts"]) == {"8080/tcp", "8443/tcp"}
    # Built as the Docker format: an OCI image has no health check. python3: the Debian base has no `python`.
    assert inspected["Healthcheck"]["Test"][:3] == ["CMD", "python3", "-c"], inspected.get("Healthcheck")
    assert inspected["Size"] < MAX_SIZE, inspected["Size"]
    root = Path(podman("image", "mount", image).stdout.strip())
    try:
        passwd = (root / "etc" / "passwd").read_text()
        assert "icpgate:x:10001:10001::/var/lib/icpgate:/usr/sbin/nologin" in passwd.splitlines()
        assert (root / "usr" / "local" / "bin" / "icpgate").readlink() == Path("/opt/icpgate/bin/icpgate")
        assert (root / "opt" / "icpgate" / "bin" / "icpgate").is_file()
        assert not (root / "opt" / "icpgate" / "bin" / "pip").exists()  # only building needed it
        assert (root / "usr" / "bin" / "setpriv").is_file() and (root / "usr" / "bin" / "python3").exists()
        installed = (root / "etc" / "icpgate" / "config.toml").read_text()
        assert 'path = "/var/lib/icpgate/registry.db"' in installed.splitlines()
    finally:
        podman("image", "unmount", image, check=False)
    version = subprocess.run([*PODMAN_RUN, "--rm", image, "--version"], capture_output=True, text=True, timeout=120)
    assert version.stdout.strip().startswith("icpgate "), version.stderr


def test_the_image_serves_a_filed_site_and_the_block_page_unprivileged(image: str, tmp_path: Path) -> None:
    """The image's own entry point and config, the state in a volume: what `podman run IMAGE` does."""
    with namespace() as netns, volume() as state, origin(netns, tmp_path):
        import_samples(netns, state)
        network = ["--network", "ns:/run/netns/" + netns, "--security-opt", "no-new-privileges"]
        with container([*network, "-v", state + ":/var/lib/icpgate", image]) as name:
            wait_ready(netns, name)
            status, body = curl(netns, "http://127.0.0.1:8080/", "example-filed.cn")
            assert status == 200 and json.loads(body)["host"] == "example-filed.cn", body
            status, body = curl(netns, "http://127.0.0.1:8080/", "www.example-unfiled.cn")
            assert status == 403 and "网站未备案" in body, body
            assert podman("healthcheck", "run", name, check=False).returncode == 0

            for process in process_status(name):  # the supervisor and each worker
                assert process["Uid"].split() == ["10001"] * 4 and process["Gid"].split() == ["10001"] * 4
                assert caps(process, "CapEff") == caps(process, "CapPrm") == caps(process, "CapAmb") == 0
                assert process["NoNewPrivs"] == "1"

            def recorded() -> bool:  # the guide's `exec`: the same config, so the daemon's violation log
                answer = podman("exec", name, "icpgate", "violations", "--json", "-c", "/etc/icpgate/config.toml")
                return any(item["host"] == "www.example-unfiled.cn" for item in json.loads(answer.stdout)["items"])

            deadline = time.monotonic() + 30
            while not recorded():
                assert time.monotonic() < deadline, "the block never reached the violation log"
                time.sleep(1)
            stopped = podman("stop", "--time", "30", name)
            assert stopped.returncode == 0
            assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
            logs = podman("logs", name).stderr
            assert "Traceback" not in logs and "plain HTTP is read by the compiled engine" in logs, logs[-2000:]

        low = tmp_path / "low.toml"  # the guide's reason for ports of 1024 and up: the user has no capability
        low.write_text(installed_config().replace("port = 8080", "port = 80"))
        refused = subprocess.run([*PODMAN_RUN, "--rm", "--network", "ns:/run/netns/" + netns,
                                  "-v", state + ":/var/lib/icpgate", "-v", "%s:/etc/icpgate/config.toml:ro" % low,
                                  image], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert (
            "cannot listen on 127.0.0.1:80/http: Permission denied (a port below 1024 needs CAP_NET_BIND_SERVICE)"
            in refused.stderr
        ), refused.stderr[-3000:]


def test_transparent_mode_runs_with_cap_net_admin_alone_and_not_without_it(image: str, tmp_path: Path) -> None:
    """The guide's transparent-mode command, with the test's namespace for the host's network: the
    transparent listeners bind (IP_TRANSPARENT) as icpgate with CAP_NET_ADMIN and no other
    capability in effect; the image's plain user, which has none, is refused with the reason."""
    inline = tmp_path / "config.toml"
    inline.write_text((REPO / "config.inline.example.toml").read_text())
    with namespace() as netns, volume() as state:
        import_samples(netns, state)
        argv = guide_transparent_run(netns, state, inline)
        with container(argv) as name:
            wait_ready(netns, name)
            logs = podman("logs", name).stderr
            assert "listening on 0.0.0.0:8443/quic" in logs and "listening on [::]:8000/auto" in logs, logs[-2000:]
            for process in process_status(name):
                assert process["Uid"].split() == ["10001"] * 4, process["Uid"]
                assert caps(process, "CapEff") == caps(process, "CapPrm") == caps(process, "CapAmb") == CAP_NET_ADMIN
                assert caps(process, "CapBnd") == CAP_NET_ADMIN | CAP_SETUID | CAP_SETGID
                assert process["NoNewPrivs"] == "1"

        refused = subprocess.run([*PODMAN_RUN, "--rm", "--network", "ns:/run/netns/" + netns,
                                  "-v", state + ":/var/lib/icpgate", "-v", "%s:/etc/icpgate/config.toml:ro" % inline,
                                  image], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert ": Operation not permitted (a transparent listener needs CAP_NET_ADMIN)" in refused.stderr, (
            refused.stderr[-3000:]
        )
