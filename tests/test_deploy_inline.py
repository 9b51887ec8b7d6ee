"""Deployment files of inline mode, and the Docker story the guide tells.

The bypass unit and the transparent drop-in pass `systemd-analyze verify` and grant what the guide
says. The guide's Docker commands are checked against the image statically here: the user, the
ports it publishes and the ones the image exposes, the capabilities; the setpriv part of the
transparent-mode command, keeping CAP_NET_ADMIN across the switch to an unprivileged user, runs for
real in a namespace. tests/test_image.py builds the image and runs the transparent-mode command in it.
"""

from __future__ import annotations

import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SYSTEMD = REPO / "systemd"
GUIDE = REPO / "docs" / "deployment.md"


def unit_settings(*paths: Path) -> dict[str, list[str]]:
    """Every `Key=value` of the files in order; an empty assignment resets the list, as systemd does."""
    settings: dict[str, list[str]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                settings[key] = [*settings.get(key, []), value] if value else []
    return settings


def verify(tmp_path: Path, *units: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on copies pointing at this install; drop-in folders come along."""
    installed = Path(sys.executable).with_name("icpgate")
    for unit in units:
        (tmp_path / unit).write_text((SYSTEMD / unit).read_text().replace("/usr/local/bin/icpgate", str(installed)))
    shutil.copytree(SYSTEMD / "icpgate.service.d", tmp_path / "icpgate.service.d")
    return subprocess.run([shutil.which("systemd-analyze") or "systemd-analyze", "verify", *units],
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip


def test_the_bypass_unit_and_the_transparent_drop_in_verify(tmp_path: Path) -> None:
    result = verify(tmp_path, "icpgate.service", "icpgate-bypass.service")
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr  # the drop-in is read: no warning


def test_the_drop_in_adds_cap_net_admin_and_the_bypass_unit_has_nothing_else() -> None:
    gate = unit_settings(SYSTEMD / "icpgate.service", SYSTEMD / "icpgate.service.d" / "transparent.conf")
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert set(" ".join(gate[key]).split()) == {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert gate["DynamicUser"] == ["yes"] and gate["NoNewPrivileges"] == ["yes"]

    bypass = unit_settings(SYSTEMD / "icpgate-bypass.service")
    assert bypass["AmbientCapabilities"] == bypass["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert "AF_NETLINK" in bypass["RestrictAddressFamilies"][0].split()  # nft speaks netlink
    assert bypass["Restart"] == ["always"]
    assert "Requires" not in bypass and "BindsTo" not in bypass and "PartOf" not in bypass  # outlives the gate
    assert bypass["ExecStart"][0].split()[1:3] == ["bypass", "watch"]


# --- Docker --------------------------------------------------------------------------------------------------
def docker_commands() -> list[list[str]]:
    """The guide's `docker run` commands, as argument lists."""
    text = GUIDE.read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("docker run"):
                commands.append(shlex.split(command))
    return commands


def option_values(command: list[str], name: str) -> list[str]:
    return [command[i + 1] for i, word in enumerate(command) if word == name]


def test_the_image_and_the_guide_agree_on_the_user_and_the_ports() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    user = re.search(r"^USER (\S+)$", dockerfile, re.M).group(1)
    exposed = {int(port) for port in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()}
    health = int(re.search(r"create_connection\(\('127\.0\.0\.1', (\d+)\)", dockerfile).group(1))
    assert user == "icpgate" and re.search(r"useradd .* icpgate\b", dockerfile)
    assert exposed and min(exposed) >= 1024  # a user without capabilities can bind them
    assert health in exposed

    commands = docker_commands()
    assert len(commands) >= 3
    published = [option_values(command, "-p") for command in commands]
    assert any(published), "the guide publishes the listener ports"
    for command, ports in zip(commands, published, strict=True):
        assert all(int(mapping.split(":")[-1]) in exposed for mapping in ports), command
        assert "NET_BIND_SERVICE" not in option_values(command, "--cap-add"), command  # never reaches a non-root user
        if "--network" in command:
            assert not ports, "publishing does nothing on the host's network"


def transparent_command() -> list[str]:
    (command,) = [command for command in docker_commands() if "NET_ADMIN" in option_values(command, "--cap-add")]
    return command


def setpriv_arguments(command: list[str]) -> list[str]:
    """`--entrypoint setpriv IMAGE <these> icpgate run ...`"""
    image = command.index("--entrypoint") + 2
    assert command[image - 1] == "setpriv" and command[image] == "icpgate"
    end = len(command) - command[::-1].index("run") - 1
    assert command[end - 1] == "icpgate"
    return command[image + 1 : end - 1]


def test_the_transparent_command_uses_the_host_network_and_only_the_capabilities_it_needs() -> None:
    command = transparent_command()
    assert option_values(command, "--network") == ["host"]
    assert option_values(command, "--cap-drop") == ["ALL"]
    assert set(option_values(command, "--cap-add")) == {"NET_ADMIN", "SETUID", "SETGID"}
    assert option_values(command, "--user") == ["root"] and option_values(command, "--entrypoint") == ["setpriv"]
    assert {"--reuid=icpgate", "--regid=icpgate", "--ambient-caps=+net_admin"} <= set(setpriv_arguments(command))


def test_setpriv_as_the_guide_runs_it_keeps_cap_net_admin_and_nothing_else(tmp_path: Path) -> None:
    """What Docker's --cap-drop ALL --cap-add ... leaves a root process, narrowed further by the
    guide's setpriv arguments, for a user that exists here: nft works, and fails without them."""
    command = transparent_command()
    added = option_values(command, "--cap-add")
    arguments = setpriv_arguments(command)
    arguments = [a.replace("=icpgate", "=nobody") for a in arguments if a != "--regid=icpgate"] + ["--regid=nogroup"]
    docker_like = ["setpriv", "--bounding-set=-all," + ",".join("+" + cap.lower() for cap in added), "--inh-caps=-all"]
    namespace = "icpdk-" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        status = "grep -E '^Cap(Eff|Amb)' /proc/self/status; id -un; nft add table inet probe && echo nft ok"
        kept = subprocess.run(["ip", "netns", "exec", namespace, *docker_like, "--", "setpriv", *arguments, "--",
                               "sh", "-c", status], capture_output=True, text=True)  # fmt: skip
        assert kept.returncode == 0, kept.stderr
        lines = kept.stdout.split("\n")
        assert lines[0].split() == ["CapEff:", "0000000000001000"]  # CAP_NET_ADMIN (bit 12) alone
        assert lines[1].split() == ["CapAmb:", "0000000000001000"]
        assert lines[2:4] == ["nobody", "nft ok"]

        without = [a for a in arguments if not a.startswith(("--inh-caps", "--ambient-caps"))]
        lost = subprocess.run(["ip", "netns", "exec", namespace, *docker_like, "--", "setpriv", *without, "--",
                               "nft", "add", "table", "inet", "probe2"], capture_output=True, text=True)  # fmt: skip
        assert lost.returncode != 0 and "Operation not permitted" in lost.stderr
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
