"""One source of truth for where the state is: the installed config holds the registry's path, no
unit file or Dockerfile overrides it, so an operator's `icpgate violations` with that config reads
the log the daemon writes; and a command pointed at a registry or log that does not exist, or given
a filter value that can never match, fails loudly instead of answering from nothing."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gatekit import free_port, wait_for_port
from test_gate_process import http_get, status_of, wait_until

from conftest import REPO, SAMPLES, run_icpgate
from icpgate.config.settings import load_config

SYSTEMD = REPO / "systemd"
DOCKERFILE = REPO / "Dockerfile"
GUIDE = REPO / "docs" / "deployment.md"
STATE = Path("/var/lib/icpgate")  # the unit's StateDirectory=icpgate and the image's VOLUME
# Keys naming files the daemon writes: set in the config, they are what every command reads too.
STATE_KEYS = {"registry.path", "violations.path", "publish.cache_dir", "admin.metrics_dir", "gate.tls_ca_dir"}
ICPGATE = str(Path(sys.executable).with_name("icpgate"))


# --- what the repository ships --------------------------------------------------------------------
def unit_commands() -> dict[str, list[str]]:
    """Every Exec*= line of the shipped units and drop-ins, as argument lists, by file and key."""
    commands = {}
    for path in sorted([*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.service.d/*.conf")]):
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.startswith("Exec") and value:
                commands["%s %s" % (path.relative_to(REPO), key)] = shlex.split(value.lstrip("-@+!"))
    return commands


def dockerfile_commands() -> dict[str, list[str]]:
    """The image's CMD and ENTRYPOINT (JSON form) and RUN lines."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    commands = {}
    for number, line in enumerate(text.splitlines(), start=1):
        instruction, _, value = line.partition(" ")
        if instruction in ("CMD", "ENTRYPOINT") and value.startswith("["):
            commands["Dockerfile:%d %s" % (number, instruction)] = json.loads(value)
        elif instruction == "RUN":
            commands["Dockerfile:%d RUN" % number] = shlex.split(value)
    return commands


def guide_lines() -> list[str]:
    """The lines of docs/deployment.md's shell blocks, continuations joined, in order."""
    blocks = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def guide_commands() -> dict[str, list[str]]:
    """The guide's lines that run icpgate (directly, or in `docker run`/`docker exec`)."""
    commands = {}
    for line in guide_lines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["icpgate"] or words[:2] in (["docker", "run"], ["docker", "exec"]):
            commands[line] = words
    return commands


def state_overrides(words: list[str]) -> list[str]:
    """The `--set KEY=VALUE` arguments of a command that name a state path."""
    values = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--set"]
    values += [word.removeprefix("--set=") for word in words if word.startswith("--set=")]
    return [value for value in values if value.split("=", 1)[0].strip() in STATE_KEYS]


def test_no_shipped_unit_dockerfile_or_guide_command_overrides_a_state_path() -> None:
    commands = unit_commands() | dockerfile_commands() | guide_commands()
    assert commands["systemd/icpgate.service ExecStart"][1:2] == ["run"]  # the files were read
    assert any(key.endswith(" CMD") for key in dockerfile_commands())
    assert any(words[:2] == ["icpgate", "import"] for words in guide_commands().values())
    offending = {where: found for where, words in commands.items() if (found := state_overrides(words))}
    assert offending == {}, "state paths belong in the installed config, which the CLI reads too: %s" % offending


def install_steps() -> list[str]:
    """The guide's install lines that write /etc/icpgate, in order: the last one writes the config."""
    steps = [line for line in guide_lines() if "/etc/icpgate" in line and not line.startswith(("icpgate", "docker"))]
    steps = steps[: next(i for i, line in enumerate(steps) if "/etc/icpgate/config.toml" in line) + 1]
    assert steps[0].startswith("install -d /etc/icpgate"), steps
    return steps


def dockerfile_install() -> str:
    """The image's RUN line that writes /etc/icpgate/config.toml, as the shell runs it."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("RUN ") and "/etc/icpgate/config.toml" in line]
    return line.removeprefix("RUN ")


@pytest.mark.parametrize("where", ["guide", "Dockerfile"])
def test_the_installed_config_keeps_the_state_where_the_unit_and_the_image_do(tmp_path: Path, where: str) -> None:
    """The install commands as shipped, run with /etc/icpgate in a temporary folder."""
    etc = tmp_path / "etc"
    etc.mkdir()
    if where == "guide":
        steps = install_steps()
    else:
        shutil.copytree(REPO / "policies", etc / "policies")
        shutil.copy(REPO / "config.example.toml", etc / "config.example.toml")
        steps = [dockerfile_install()]
    for step in steps:
        subprocess.run(["bash", "-euo", "pipefail", "-c", step.replace("/etc/icpgate", str(etc))], cwd=REPO,
                       check=True)  # fmt: skip
    config = load_config(etc / "config.toml")
    assert config.registry_path == STATE / "registry.db"
    assert config.violations.path == STATE / "registry.violations.db"
    assert re.search(r"^StateDirectory=%s$" % STATE.name, (SYSTEMD / "icpgate.service").read_text(), re.M)
    assert re.search(r'^VOLUME \["%s"\]$' % STATE, DOCKERFILE.read_text(), re.M)
    check = run_icpgate("config", "check", "-c", str(etc / "config.toml"))
    assert check.returncode == 0, check.stderr


# --- the story on a running daemon ----------------------------------------------------------------
class Root:
    """The paths of an installed machine, under a temporary folder (the commands are the shipped ones)."""

    def __init__(self, tmp: Path) -> None:
        self.map = {"/usr/local/bin/icpgate": ICPGATE, "/etc/icpgate": str(tmp / "etc" / "icpgate"),
                    str(STATE): str(tmp / "var" / "lib" / "icpgate")}  # fmt: skip

    def __call__(self, text: str) -> str:
        for path, here in self.map.items():
            text = text.replace(path, here)
        return text


def test_the_cli_with_the_installed_config_reads_the_violations_the_unit_s_daemon_records(tmp_path: Path) -> None:
    """Installed as docs/deployment.md says, started as the unit's ExecStart says, asked as an operator
    asks: the blocked site is in `icpgate violations` and the ISMS export. Before, the unit gave the
    daemon `--set registry.path=/var/lib/...` and the CLI read /etc/icpgate/var/: "no violations
    recorded", exit 0."""
    root = Root(tmp_path)
    for step in install_steps():
        subprocess.run(["bash", "-euo", "pipefail", "-c", root(step)], cwd=REPO, check=True)
    config = Path(root("/etc/icpgate/config.toml"))
    http, tls, admin = free_port(), free_port(), free_port()
    text = config.read_text(encoding="utf-8")  # the operator's edits: ports, one worker, no DNS queries out
    for old, new in (("port = 8080", "port = %d" % http), ("port = 8443", "port = %d" % tls),
                     ("port = 9180", "port = %d" % admin), ('workers = "auto"', "workers = 1"),
                     ("flush_interval = 5", "flush_interval = 0.2"),
                     ("hosted ranges?\nenabled = true", "hosted ranges?\nenabled = false")):  # fmt: skip
        assert old in text, old
        text = text.replace(old, new)
    config.write_text(text, encoding="utf-8")

    (imported,) = [words for words in guide_commands().values() if words[:2] == ["icpgate", "import"]]
    words = [root(word) for word in imported]
    result = subprocess.run([ICPGATE, *words[1:2], str(SAMPLES), *words[3:]], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    exec_start = [root(word) for word in unit_commands()["systemd/icpgate.service ExecStart"]]
    log = (tmp_path / "gate.log").open("w")
    daemon = subprocess.Popen(exec_start, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(http, process=daemon)
        assert status_of(http_get(http, "www.example-unfiled.cn")) == 403

        def listed() -> list[dict]:
            answer = subprocess.run([ICPGATE, "violations", "--json", "-c", root("/etc/icpgate/config.toml")],
                                    capture_output=True, text=True)  # fmt: skip
            assert answer.returncode == 0, answer.stderr
            return json.loads(answer.stdout)["items"]

        wait_until(lambda: any(item["host"] == "www.example-unfiled.cn" for item in listed()), timeout=15)
        isms = subprocess.run([ICPGATE, "violations", "--isms", "--include-unconfirmed", "-c", str(config)],
                              capture_output=True, text=True)  # fmt: skip
        assert isms.returncode == 0 and "www.example-unfiled.cn" in isms.stdout, isms.stdout + isms.stderr
        assert Path(root(str(STATE / "registry.violations.db"))).is_file()
        assert not (config.parent / "var").exists()  # nothing under /etc/icpgate/var any more

        refused = subprocess.run([ICPGATE, "violations", "--reason", "foo", "-c", str(config)],
                                 capture_output=True, text=True)  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as api:
            urllib.request.urlopen("http://127.0.0.1:%d/api/v1/violations?reason=foo" % admin, timeout=10)
        assert (refused.returncode, api.value.code) == (2, 400), refused.stderr
        assert "invalid choice: 'foo'" in refused.stderr and "'unfiled'" in refused.stderr
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0
    assert "Traceback" not in (tmp_path / "gate.log").read_text()


# --- loud failures ----------------------------------------------------------------------------------
@pytest.fixture
def registry_only(tmp_path: Path) -> Path:
    """A config whose registry holds the samples, and no violation log: no daemon ran on it."""
    config = tmp_path / "config.toml"
    config.write_text('[provider]\nid = "IDC-EXAMPLE"\n[registry]\npath = "registry.db"\n[policy]\npack = "%s"\n'
                      % (REPO / "policies" / "default.toml"), encoding="utf-8")  # fmt: skip
    assert run_icpgate("import", str(SAMPLES), "-c", str(config)).returncode == 0
    return config


@pytest.mark.parametrize("command", [
    ["violations"], ["violations", "--json"], ["violations", "--csv"], ["violations", "--isms"],
    ["violations", "--isms", "--include-unconfirmed"], ["violations", "--confirmed", "--reason", "unfiled"],
    ["violations", "ack", "1"], ["violations", "resolve", "1", "--note", "called"], ["customers", "list"],
])  # fmt: skip
def test_a_missing_violation_log_fails_with_its_path(registry_only: Path, command: list[str]) -> None:
    result = run_icpgate(*command, "-c", str(registry_only))
    log = registry_only.parent / "registry.violations.db"
    assert (result.returncode, result.stdout) == (5, ""), result.stdout + result.stderr
    assert "no violation log at %s" % log in result.stderr and str(registry_only) in result.stderr
    assert not log.exists()  # a reading command creates nothing


def test_a_missing_registry_fails_with_its_path_and_is_not_created(tmp_path: Path) -> None:
    """Every command that only reads the registry; before, `feed diff` created an empty one."""
    config = tmp_path / "config.toml"
    config.write_text('[provider]\nid = "IDC-EXAMPLE"\n[registry]\npath = "var/registry.db"\n[policy]\npack = "%s"\n'
                      '[feed]\nurls = ["http://127.0.0.1:%d/feed/v1"]\nallow_unsigned = true\n'
                      % (REPO / "policies" / "default.toml", free_port()), encoding="utf-8")  # fmt: skip
    for command in (["check", "example-filed.cn"], ["check", "example-filed.cn", "--json"], ["feed", "status"],
                    ["feed", "status", "--json"], ["feed", "diff"], ["feed", "diff", "--json"]):  # fmt: skip
        result = run_icpgate(*command, "-c", str(config))
        assert (result.returncode, result.stdout) == (5, ""), (command, result.stdout + result.stderr)
        assert "registry %s does not exist" % (tmp_path / "var" / "registry.db") in result.stderr, command
        assert not (tmp_path / "var").exists(), command


def test_filters_with_a_closed_set_of_values_refuse_what_can_never_match(registry_only: Path) -> None:
    customers = registry_only.parent / "customers.csv"
    customers.write_text("network,name,contract\n203.0.113.0/24,Example Co,C-1\n", encoding="utf-8")
    assert run_icpgate("customers", "import", str(customers), "-c", str(registry_only)).returncode == 0  # the log
    for option, value, message in (("--reason", "foo", "invalid choice: 'foo' (choose from 'filed', "),
                                    ("--reason", "Unfiled", "invalid choice: 'Unfiled'"),
                                    ("--ip", "203.0.113", "'203.0.113' is not an IP address"),
                                    ("--dns", "yes", "invalid choice: 'yes'"),
                                    ("--state", "closed", "invalid choice: 'closed'")):  # fmt: skip
        result = run_icpgate("violations", option, value, "-c", str(registry_only))
        assert (result.returncode, result.stdout) == (2, ""), (option, result.stdout + result.stderr)
        assert message in result.stderr, result.stderr
    result = run_icpgate("violations", "--reason", "unfiled", "--ip", "203.0.113.7", "-c", str(registry_only))
    assert (result.returncode, result.stdout) == (0, "no violations recorded\n"), result.stderr  # a log, empty
