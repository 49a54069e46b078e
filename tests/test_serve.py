"""rollout/serve.py's launcher: SIGTERM or SIGINT stops it and its server promptly (it used to
deadlock in its signal handler and leave the server running). A stand-in `python` serves
`/health` with the standard library, so this runs without vLLM."""

import signal
import subprocess
import sys
import time
import urllib.request

import pytest

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for vLLM's interpreter: serves /health (a file) on the --port it is given.
while [ $# -gt 0 ]; do [ "$1" = --port ] && port=$2; shift; done
cd "$(dirname "$0")/root" && exec {python} -m http.server "$port" --bind 127.0.0.1
"""


def _listening(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_launcher_stops_itself_and_the_server_on_a_signal(tmp_path, sig):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "health").write_text("ok")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "megatron_rmt.rollout.serve", "--model", "unused",
         "--python", str(fake), "--startup-timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        line = launcher.stdout.readline()
        assert "server ready" in line, line
        url = line.split("ready: ")[1].split()[0]
        assert _listening(url)
        launcher.send_signal(sig)
        assert launcher.wait(timeout=20) == 0
        deadline = time.monotonic() + 10
        while _listening(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _listening(url), "the server outlived its launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
