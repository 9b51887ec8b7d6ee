"""The block page as a person sees it: headless Chromium, phone and desktop, through the real gate."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ACCENT = (0xB4, 0x23, 0x18)  # the card's top border in policies/templates/block.html


def chromium(tmp_path: Path, port: int, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--user-data-dir=%s" % (tmp_path / "profile"), "--host-resolver-rules=MAP %s 127.0.0.1" % host,
         *args, "http://%s:%d/some/page" % (host, port)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(("device", "size"), [("phone", (390, 844)), ("desktop", (1280, 900))])
def test_block_page_renders_with_domain_and_reason(gate, tmp_path: Path, device: str, size: tuple[int, int]) -> None:
    host = "www.example-unfiled.cn"
    dom = chromium(tmp_path, gate.ports["http"], host, "--dump-dom", "--window-size=%d,%d" % size)
    assert 'id="domain">www.example-unfiled.cn<' in dom.stdout, dom.stderr[-2000:]
    assert 'id="reason">unfiled<' in dom.stdout
    assert "网站未备案" in dom.stdout and "This website has no ICP filing" in dom.stdout

    shot = tmp_path / ("block-%s.png" % device)
    chromium(tmp_path, gate.ports["http"], host, "--screenshot=%s" % shot, "--window-size=%d,%d" % size)
    image = Image.open(shot).convert("RGB")
    assert image.size == size
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50, "the screenshot is blank"
    assert any(_near(colour, ACCENT) for _, colour in colours), "the page's accent colour is not on screen"
    # Nothing wider than the screen: the rightmost column is page background, not cut-off content.
    right_edge = {image.getpixel((size[0] - 1, y)) for y in range(0, size[1], 7)}
    assert len(right_edge) <= 2


def _near(colour: tuple[int, int, int], target: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 6 for a, b in zip(colour, target, strict=True))
