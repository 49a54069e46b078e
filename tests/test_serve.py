"""rollout/serve.py's launcher never leaves a server or its children behind: SIGTERM or SIGINT
stops it and the server's whole process group promptly; a server that dies on its own takes the
children it left (vLLM's EngineCore) with it; a `kill -9` of the launcher stops the server.

A stand-in `python` serves `/health` with the standard library and starts a child standing in
for vLLM's EngineCore, so this runs without vLLM."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for vLLM's interpreter: serves /health (a file) on the --port it is given, beside a
# child standing in for vLLM's EngineCore; SIGTERM stops both, as it stops vLLM's server.
while [ $# -gt 0 ]; do [ "$1" = --port ] && port=$2; shift; done
sleep 600 & engine=$!
cd "$(dirname "$0")/root"
{python} -m http.server "$port" --bind 127.0.0.1 & web=$!
trap 'kill $engine $web; exit 0' TERM
wait
"""


def _listening(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def group_members(group: int) -> list[psutil.Process]:
    """The live processes of a process group (zombies are not alive)."""
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == group and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def wait_group_gone(group: int, within_s: float) -> list[psutil.Process]:
    """What is left of the group after at most `within_s` seconds (empty: all gone)."""
    deadline = time.monotonic() + within_s
    while (left := group_members(group)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@contextlib.contextmanager
def launched(*args: str):
    """`python -m megatron_rmt.rollout.serve ARGS` until it prints its URL; yields (the launcher,
    the URL, the server's process group). Afterwards no process of either is left."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_rmt.rollout.serve", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    group = None
    try:
        line = proc.stdout.readline()
        assert "server ready" in line, line
        (server,) = psutil.Process(proc.pid).children()
        group = os.getpgid(server.pid)
        assert group == server.pid != os.getpgid(proc.pid)  # the server leads its own group
        yield proc, line.split("ready: ")[1].split()[0], group
    finally:
        if proc.poll() is None:
            proc.kill()
        if group is not None:  # whatever the test's outcome, leave nothing behind
            for p in group_members(group):
                p.kill()


@pytest.fixture
def launcher(tmp_path):
    """The launcher on the stand-in server: (its process, the server URL, the server's group)."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "health").write_text("ok")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    with launched("--model", "unused", "--python", str(fake), "--startup-timeout", "30") as run:
        _, url, group = run
        assert _listening(url)
        assert len(group_members(group)) == 3  # bash, the engine stand-in, the web server
        yield run


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_launcher_stops_itself_and_the_server_on_a_signal(launcher, sig):
    proc, url, group = launcher
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 0
    assert wait_group_gone(group, 10) == [], "a process of the server outlived its launcher"
    assert not _listening(url)


def test_a_dead_server_takes_its_children_with_it(launcher):
    proc, url, group = launcher
    os.kill(group, signal.SIGKILL)  # the server dies on its own: its children are orphaned
    assert proc.wait(timeout=20) != 0  # the launcher ends with it
    assert wait_group_gone(group, 10) == [], "the server's children outlived it"


def test_a_killed_launcher_takes_the_server_with_it(launcher):
    proc, url, group = launcher
    proc.kill()  # SIGKILL: the launcher can clean up nothing
    proc.wait(timeout=10)
    assert wait_group_gone(group, 20) == [], "the server outlived its killed launcher"
    assert not _listening(url)


def test_cpu_server_threads_default_to_one_and_follow_the_option():
    from megatron_rmt.rollout.serve import server_env

    base = {"OMP_NUM_THREADS": "8", "PATH": "/bin"}
    assert server_env(False, base)["OMP_NUM_THREADS"] == "1"  # shares the cores: the tests
    assert server_env(False, base, cpu_threads=2)["OMP_NUM_THREADS"] == "2"
    assert server_env(True, base, cpu_threads=2)["OMP_NUM_THREADS"] == "8"  # GPU: untouched
    assert server_env(False, base)["OMP_WAIT_POLICY"] == "PASSIVE"  # idle threads sleep
    assert "OMP_WAIT_POLICY" not in server_env(True, base)


def test_a_cpu_server_preloads_tcmalloc_where_installed_and_keeps_the_callers_preloads(
    monkeypatch,
):
    from megatron_rmt.rollout import serve

    monkeypatch.setattr(serve.ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    monkeypatch.setitem(serve.CPU_ENV, "LD_PRELOAD", serve._tcmalloc()["LD_PRELOAD"])
    assert serve.server_env(False, {})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    mine = serve.server_env(False, {"LD_PRELOAD": "libmine.so"})["LD_PRELOAD"]
    assert mine == "libtcmalloc_minimal.so.4:libmine.so"
    assert "LD_PRELOAD" not in serve.server_env(True, {})  # GPU servers: untouched
    monkeypatch.setattr(serve.ctypes.util, "find_library", lambda name: None)
    assert serve._tcmalloc() == {}  # not installed: no preload
