"""Helpers for app tests: start `python app.py` in its own process on a free port, and drive it with
Debian's Chromium through Playwright (never `playwright install`).

Browser tests fail (not skip) when /usr/bin/chromium is missing, unless EMBEDTRAIN_SKIP_BROWSER=1:
CI installs chromium, so a silent skip there would hide a broken UI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("EMBEDTRAIN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app_server(outputs: Path, *args: str, timeout: float = 90.0):
    """Yield the URL of a running `python app.py --outputs OUTPUTS ARGS...`; stop it afterwards."""
    port = free_port()
    log = open(Path(outputs).parent / f"app-{port}.log", "wb")
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--outputs", str(outputs),
                             *args], cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{Path(log.name).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > timeout:
                raise RuntimeError(f"app.py did not serve {url} within {timeout} s")
            time.sleep(0.25)
        yield url
    finally:
        _kill_job(Path(outputs))
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _kill_job(outputs: Path) -> None:
    """A training job outlives the server by design; a test must not leave one running."""
    import json
    import signal
    try:
        job = json.loads((outputs / ".job.json").read_text())
        os.killpg(job["pid"], signal.SIGKILL)  # jobs run in their own session: kill the whole group
    except (FileNotFoundError, ValueError, KeyError, ProcessLookupError, PermissionError):
        pass


@contextmanager
def chromium_page(width: int = 1400, height: int = 1000):
    if not Path(CHROMIUM).exists():
        if os.environ.get("EMBEDTRAIN_SKIP_BROWSER") == "1":
            pytest.skip("no chromium and EMBEDTRAIN_SKIP_BROWSER=1")
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (or set EMBEDTRAIN_SKIP_BROWSER=1)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()
