"""Debian's Chromium, headless, on a local file: the DOM it built, and a screenshot.

`make system-deps` installs it (as root). Flags: no GPU, no sandbox (root), and none of the
background connections this machine's closed network would refuse; a fresh profile each run.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1")


def binary() -> str:
    found = shutil.which("chromium")
    if not found:
        raise RuntimeError("chromium is not installed: run `make system-deps` as root "
                           "(Debian package chromium)")
    return found


def _run(args: list[str], timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="podtally-chromium-") as profile:
        return subprocess.run([binary(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout, check=True)


def dump_dom(page: Path) -> str:
    """The DOM Chromium built from the page, serialized."""
    return _run(["--dump-dom", page.resolve().as_uri()]).stdout


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2400) -> Path:
    result = _run([f"--window-size={width},{height}", f"--screenshot={png}",
                   page.resolve().as_uri()])
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot: {result.stderr[-2000:]}")
    return png
