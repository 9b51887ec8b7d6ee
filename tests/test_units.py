"""Every long-running part has a systemd unit, and every unit is as hardened as the gate's.

The units (systemd/*.service, *.path, the drop-ins) pass `systemd-analyze verify` together; each
service keeps the gate's hardening and its dynamic user, so all of them share one state directory;
the spool folder's path unit watches exactly what `icpgate import` takes, in the folder the import
service is given and may write, which the shipped tmpfiles and sysusers lines create with the group
the service has. Then the import and feed units' own command lines run, with their paths moved
under a temporary folder: the import takes a spool folder without a network, the publisher serves
with its tokens and key where systemd's credentials put them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from feedkit import make_key, write_tokens
from gatekit import free_port, wait_for_port
from miitkit import Site, Subject, baxx, document, v4, write_gbk

from conftest import REPO, SAMPLES, run_icpgate
from icpgate.feed.sources import DownloadFolder

SYSTEMD = REPO / "systemd"
ICPGATE = str(Path(sys.executable).with_name("icpgate"))
SERVICES = [
    "icpgate.service",
    "icpgate-bypass.service",
    "icpgate-feed.service",
    "icpgate-import.service",
    "icpgate-fleet.service",
    "icpgate-backup.service",
]
# What the gate's unit does to contain the daemon: every service keeps it, value for value.
HARDENING = ["DynamicUser", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
             "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
             "ProtectClock", "ProtectHostname", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
             "LockPersonality", "SystemCallArchitectures", "SystemCallFilter"]  # fmt: skip


def settings(unit: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, values in order; an empty assignment resets, as systemd does."""
    found: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found[key] = [*found.get(key, []), value] if value else []
    return found


def one(unit: str, key: str) -> str:
    (value,) = settings(unit)[key]
    return value


def test_every_unit_verifies_together(tmp_path: Path) -> None:
    units = sorted(path.name for path in SYSTEMD.iterdir() if path.suffix in (".service", ".path", ".timer"))
    assert set(SERVICES) | {"icpgate-import.path"} <= set(units), units
    for unit in units:
        (tmp_path / unit).write_text((SYSTEMD / unit).read_text().replace("/usr/local/bin/icpgate", ICPGATE))
    shutil.copytree(SYSTEMD / "icpgate.service.d", tmp_path / "icpgate.service.d")
    result = subprocess.run([shutil.which("systemd-analyze") or "systemd-analyze", "verify", *units],
                            capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr  # unknown keys only warn


def test_every_service_is_hardened_like_the_gate_and_runs_as_its_user() -> None:
    gate = settings("icpgate.service")
    assert all(gate.get(key) for key in HARDENING), [key for key in HARDENING if not gate.get(key)]
    every = sorted(path.name for path in SYSTEMD.glob("*.service"))  # a unit added later is held to it too
    assert set(SERVICES) <= set(every), every
    for unit in every:
        found = settings(unit)
        assert {key: found.get(key) for key in HARDENING} == {key: gate[key] for key in HARDENING}, unit
        assert set(" ".join(found["AmbientCapabilities"]).split()) <= set(
            " ".join(found["CapabilityBoundingSet"]).split()
        )
        assert "ConfigurationDirectory" in found and found.get("User", ["icpgate"]) == ["icpgate"], unit
    for unit in ("icpgate-feed.service", "icpgate-import.service"):
        # The gate's user by name (its unit's, icpgate), so one dynamic uid owns the one state directory.
        assert one(unit, "User") == "icpgate" and one(unit, "StateDirectory") == one(
            "icpgate.service", "StateDirectory"
        )
        assert settings(unit)["CapabilityBoundingSet"] == settings(unit)["AmbientCapabilities"] == []  # none at all
    assert one("icpgate-import.service", "PrivateNetwork") == "yes"  # it reads files; it needs no network


def spool_folder() -> Path:
    command = shlex.split(one("icpgate-import.service", "ExecStart"))
    assert command[1] == "import" and command[3:] == ["-c", "/etc/icpgate/config.toml"]
    return Path(command[2])


def tmpfiles_line() -> list[str]:
    (line,) = [line.split() for line in (SYSTEMD / "icpgate.tmpfiles").read_text().splitlines()
               if line and not line.startswith("#")]  # fmt: skip
    return line


def test_the_path_unit_watches_what_the_import_takes_where_the_service_may_write(tmp_path: Path) -> None:
    folder = spool_folder()
    watched = settings("icpgate-import.path")
    assert watched["Unit"] == ["icpgate-import.service"]
    assert sorted(watched["PathExistsGlob"]) == sorted(str(folder / pattern) for pattern in DownloadFolder.PATTERNS)
    service = settings("icpgate-import.service")
    assert service["ReadWritePaths"] == [str(folder)]  # ProtectSystem=strict: it moves files into imported/
    kind, path, mode, owner, group = tmpfiles_line()[:5]
    assert (kind, path, mode, owner) == ("d", str(folder), "2770", "root") and service["SupplementaryGroups"] == [group]

    # The shipped lines, applied by systemd's own tools to an empty root: the group, then the folder.
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for tool, source in (("systemd-sysusers", "icpgate.sysusers"), ("systemd-tmpfiles", "icpgate.tmpfiles")):
        argv = [tool, "--root", str(root), *(["--create"] if tool == "systemd-tmpfiles" else [])]
        applied = subprocess.run([*argv, "-"], input=(SYSTEMD / source).read_text(), capture_output=True, text=True)
        assert applied.returncode == 0, applied.stderr
    (gid,) = [int(line.split(":")[2]) for line in (root / "etc" / "group").read_text().splitlines()
              if line.startswith(group + ":")]  # fmt: skip
    made = (root / str(folder).lstrip("/")).stat()
    assert (oct(made.st_mode & 0o7777), made.st_uid, made.st_gid) == ("0o2770", 0, gid)


class Root:
    """The paths the units name, moved under a temporary folder; the commands are the units' own."""

    def __init__(self, tmp: Path) -> None:
        self.map = {"/usr/local/bin/icpgate": ICPGATE, "/etc/icpgate": str(tmp / "etc"),
                    "/var/lib/icpgate": str(tmp / "state"), "/var/spool/icp": str(tmp / "spool"),
                    "/run/credentials": str(tmp / "credentials")}  # fmt: skip
        for path in list(self.map.values())[1:]:
            Path(path).mkdir(parents=True)

    def __call__(self, text: str) -> str:
        for path, here in self.map.items():
            text = text.replace(path, here)
        return text

    def install_config(self, edits: dict[str, str] | None = None) -> Path:
        """docs/deployment.md's installed config (the registry in the state directory), with `edits`."""
        text = (REPO / "config.example.toml").read_text()
        pack = 'pack = "%s"' % (REPO / "policies" / "default.toml")
        edits = {'\npath = "var/registry.db"\n': '\npath = "/var/lib/icpgate/registry.db"\n',
                 'pack = "policies/default.toml"': pack, **(edits or {})}  # fmt: skip
        for old, new in edits.items():
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        config = Path(self("/etc/icpgate/config.toml"))
        config.write_text(self(text))
        return config

    def command(self, unit: str, key: str, environment: dict[str, str] | None = None) -> list[str]:
        line = one(unit, key)
        for name, value in (environment or {}).items():
            line = line.replace("${%s}" % name, value)
        return [self(word) for word in shlex.split(line)]


def test_the_import_unit_takes_the_spool_folder_without_a_network(tmp_path: Path) -> None:
    """ExecStartPre and ExecStart as the unit has them, in a network namespace of their own (what
    PrivateNetwork=yes gives): two download files imported in order and moved into imported/."""
    root = Root(tmp_path)
    root.install_config()
    spool = Path(root(str(spool_folder())))
    ranges = [(3001, 10001, [(v4("203.0.113.0"), v4("203.0.113.255"))])]
    for number in (1, 2):
        licence = "京ICP备2026900%d号" % number
        site = Site(4000 + number, licence + "-1", "站%d" % number, ["spool-%d.example.cn" % number], ranges)
        subject = Subject(5000 + number, licence, "示例%d" % number, sites=[site])
        write_gbk(spool / ("download-%d.xml" % number), document(baxx(subject)))
    for key in ("ExecStartPre", "ExecStart"):
        ran = subprocess.run(["unshare", "--net", *root.command("icpgate-import.service", key)], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert ran.returncode == 0, ran.stderr
    assert re.findall(r"imported (\d) filings? from \S+/(download-\d\.xml)", ran.stdout) == [
        ("1", "download-1.xml"), ("1", "download-2.xml")], ran.stdout  # fmt: skip
    assert sorted(path.name for path in spool.iterdir()) == ["imported"]
    assert sorted(path.name for path in (spool / "imported").iterdir()) == ["download-1.xml", "download-2.xml"]


def test_the_feed_unit_serves_with_its_credentials_on_its_address(tmp_path: Path) -> None:
    """The publisher as its unit starts it: the listen address from its Environment= (here a free
    loopback port), the tokens and the signing key where LoadCredential= puts them, under the names
    the unit's comment gives the config."""
    unit = "icpgate-feed.service"
    root = Root(tmp_path)
    named = dict(re.findall(r'^#\s+publish\.(tokens_file|signing_key) = "(\S+)"$', (SYSTEMD / unit).read_text(), re.M))
    config = root.install_config({'signing_key = ""': 'signing_key = "%s"' % named["signing_key"],
                                  'tokens_file = ""': 'tokens_file = "%s"' % named["tokens_file"]})  # fmt: skip
    assert run_icpgate("import", str(SAMPLES), "-c", str(config)).returncode == 0  # the install's first import
    tokens = write_tokens(tmp_path, "edge-1")
    sources = {"/etc/icpgate/feed-tokens": tokens["tokens"], "/etc/icpgate/feed-signing-key.pem": make_key(
        tmp_path / "signing.pem")[0]}  # fmt: skip
    credentials = Path(root("/run/credentials/%s" % unit))
    credentials.mkdir()
    for value in settings(unit)["LoadCredential"]:  # what systemd does at each start: copy each source
        name, source = value.split(":", 1)
        shutil.copy(sources[source], credentials / name)
    assert {str(credentials / name) for name in os.listdir(credentials)} == {root(path) for path in named.values()}

    (listen,) = [value for value in settings(unit)["Environment"] if value.startswith("ICPGATE_FEED_LISTEN=")]
    assert listen.startswith("ICPGATE_FEED_LISTEN=127.0.0.1:")  # nothing exposed until the operator says where
    port = free_port()
    environment = {"ICPGATE_FEED_LISTEN": "127.0.0.1:%d" % port}
    checked = subprocess.run(root.command(unit, "ExecStartPre"), capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    log = (tmp_path / "feed.log").open("w")
    publisher = subprocess.Popen(root.command(unit, "ExecStart", environment), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process=publisher)
        url = "http://127.0.0.1:%d/feed/v1/snapshot" % port
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        token = tokens["edge-1"].read_text().strip()
        request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
        deadline = time.monotonic() + 30
        while True:  # 503 until the first snapshot is written, a moment after the port opens
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    assert answer.status == 200 and answer.headers["Icpgate-Signature"].startswith("ed25519 ")
                    break
            except urllib.error.HTTPError as error:
                assert error.code == 503 and time.monotonic() < deadline, error
                time.sleep(0.1)
    finally:
        publisher.terminate()
        publisher.wait(30)
    assert publisher.returncode == 0, (tmp_path / "feed.log").read_text()


def test_the_credentials_a_unit_names_are_the_ones_it_loads() -> None:
    """The config lines a unit's comment gives (`/run/credentials/UNIT/ID`) match its LoadCredential=
    ids, so an operator who copies them gets files that exist."""
    for path in sorted(SYSTEMD.glob("*.service")):
        named = set(re.findall(r"/run/credentials/%s/([\w.-]+)" % re.escape(path.name), path.read_text()))
        loaded = {value.split(":", 1)[0] for value in settings(path.name).get("LoadCredential", [])}
        assert named == loaded, (path.name, named, loaded)
