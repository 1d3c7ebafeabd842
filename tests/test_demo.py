"""``saelab demo`` as a process: stopped by SIGTERM (not only Ctrl-C) it stops its worker."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _workers_of(data_dir: Path) -> list[int]:
    """Live worker processes started with this data dir."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if (b"worker" in cmdline and f"SAELAB_DATA_DIR={data_dir}".encode() in environ
                and state != "Z"):
            found.append(int(proc.name))
    return found


def test_sigterm_stops_the_demo_and_its_worker(tmp_path, tiny_llama_dir) -> None:
    data = tmp_path / "fresh" / "data"  # a data dir that does not exist yet
    env = {**os.environ, "SAELAB_DATA_DIR": str(data), "SAELAB_HEARTBEAT_S": "0.5"}
    demo = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main()", "demo", "--model",
         str(tiny_llama_dir), "--layer", "1", "--tokens", "200000", "--latents", "64",
         "--k", "4", "--explain", "0", "--steer-eval", "0", "--port", "0", "--no-serve"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # liveness bounds, generous for a loaded CI box
        while time.monotonic() < deadline:
            if _running(data) and _workers_of(data):
                break
            assert demo.poll() is None, demo.stderr.read().decode()[-2000:]
            time.sleep(0.3)
        else:
            raise AssertionError("the demo's job never started")
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) != 0
        served = re.search(rb"explorer: http://127\.0\.0\.1:(\d+)/", demo.stderr.read())
        assert served and int(served[1]) != 8000  # --port 0: a free port, not the default
        deadline = time.monotonic() + 60
        while _workers_of(data) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not _workers_of(data), "the worker outlived the demo"
    finally:
        if demo.poll() is None:
            demo.kill()
        for pid in _workers_of(data):
            os.kill(pid, signal.SIGKILL)


def _running(data: Path) -> bool:
    try:
        with sqlite3.connect(data / "saelab.db") as db:
            return db.execute("SELECT count(*) FROM jobs WHERE state = 'running'"
                              ).fetchone()[0] > 0
    except sqlite3.Error:
        return False
