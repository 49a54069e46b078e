"""Start vLLM's OpenAI-compatible server as the rollout service, wait until it answers, stop it.

    python -m megatron_rmt.rollout.serve --model HF_DIR [--host 127.0.0.1] [--port N]
        [--api-key K] [--python PY] [--device auto|cpu|gpu] [--weight-transfer gloo|nccl]
        [--cpu-threads N]
        [-- extra vLLM flags]

Prints the URL to pass as `--rollout-url`, then runs until SIGINT/SIGTERM and stops the server;
if the server ends on its own, the launcher ends too (with its exit status). Tests and
benchmarks use `start_server(...)`, which returns a handle with `.url` and `.stop()`.

Deliberate choices:
- The server runs in its own interpreter (`--python`, default `$MEGATRON_RMT_VLLM_PYTHON`, else
  this one): vLLM may live in a different environment from the trainer, which never imports it.
  It is started as `python -m vllm.entrypoints.openai.api_server` because the `vllm` console
  script of the CPU build fails to find its own distribution name.
- Always on: `--logprobs-mode processed_logprobs` (log-probs after the temperature, which is what
  the trainer recomputes) and `VLLM_SERVER_DEV_MODE=1` (the pause / collective_rpc /
  reset_prefix_cache routes the disk weight sync drives).
- CPU gets the recipe measured in PLATFORM.md: eager mode, fp32, a 64 MiB KV cache, one
  in-process engine, TorchDynamo off (otherwise the first request compiles for seconds), one
  OpenMP thread (the trainer shares the cores). Chunked prefill is off: vLLM 0.32 on CPU kills
  its engine ("CPU Generator does not use offset") when a seeded request's prompt is split
  across scheduler steps, and every rollout request carries a seed. The GPU keeps vLLM's own
  defaults.
- Bound to 127.0.0.1 unless told otherwise. With an API key (`--api-key`, default
  $MEGATRON_RMT_VLLM_API_KEY, the variable the trainer reads) every request on every route needs
  it: vLLM's own check guards only `/v1/...`, so the server also loads
  `in_server/rmt_key_guard.py` as middleware (that folder goes on its PYTHONPATH: the server's
  environment need not have this package). The key reaches the server as $VLLM_API_KEY, never
  on its command line (which every local user can read).
- The server leads a new session (so a new process group) and its output goes to a log file:
  `stop()` ends the whole group, also when the server itself has already died and left a child
  behind (vLLM's EngineCore on GPU, ~1 GB): SIGTERM, then SIGKILL after a grace period; a
  chatty server can never block on a full pipe. Started from a main thread on Linux, the server
  also gets SIGTERM when the process that started it dies, even by SIGKILL (PR_SET_PDEATHSIG;
  the kernel sends it when the starting *thread* ends, hence main threads only).
- For trainers on other nodes bind `--host 0.0.0.0`: the printed URL then names this machine
  (`socket.getfqdn()`, or `--advertise-host`), not the loopback address. Extra flags go to vLLM
  as they are, e.g. `-- --gpu-memory-utilization 0.85 --tensor-parallel-size 2` (vLLM's default
  takes 90% of the GPU).
- `--weight-transfer gloo|nccl` adds `--weight-transfer-config {"backend": ...}`: the server then
  takes in-memory weight updates (`gloo` needs this project installed in the server's venv: it
  is a vLLM plugin, `megatron_rmt_vllm`); a `gloo` server also takes the shared-memory hand-off
  of a trainer on its host (the trainer's `--weight-transfer shm`).
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

KEY_GUARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "in_server")
KEY_ENV = "MEGATRON_RMT_VLLM_API_KEY"  # the trainer's client reads the same variable

CPU_ARGS = [
    "--enforce-eager",
    "--dtype", "float32",
    "--kv-cache-memory-bytes", str(64 << 20),
    "--distributed-executor-backend", "uni",
    "--max-model-len", "1024",
    "--no-enable-chunked-prefill",
]  # fmt: skip


def _tcmalloc() -> dict:
    """vLLM's CPU backend wants tcmalloc preloaded (it warns at start without it). Measured here
    (SmolLM2-135M, 9 in-memory syncs each): the gloo sync's median 1384 -> 650 ms, shm 752 ->
    689 ms, the outliers fewer (likely glibc handing the reload's large staging tensors back to
    the system every sync; docs/rollout.md). Used where installed (Debian:
    libtcmalloc-minimal4)."""
    name = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    return {"LD_PRELOAD": name} if name else {}


CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    # Idle OpenMP threads sleep instead of spinning: a spinning server starves a trainer on the
    # same cores (benchmarks/ahead.py --share-cores, SmolLM2: NTP pass 33 s -> 4.5 s).
    "OMP_WAIT_POLICY": "PASSIVE",
    **_tcmalloc(),
}


class ServerHandle:
    """A running server: its `url`, its process (leader of its own process group) and log file,
    the key it wants (or None); `stop()` ends it and every process it started."""

    def __init__(self, url: str, process: subprocess.Popen, log_path: str, api_key=None):
        self.url = url
        self.process = process
        self.log_path = log_path
        self.api_key = api_key

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the whole group, SIGKILL to what is left after `grace_s`; returns once no
        process of the group is left (the leader may already have exited: its children not)."""
        group = self.process.pid
        if not _signal_group(group, signal.SIGTERM):
            self.process.poll()
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.process.poll()  # reap the leader, or it would count as alive
            if not _group_alive(group):
                return
            time.sleep(0.1)
        _signal_group(group, signal.SIGKILL)
        self.process.wait()
        while _group_alive(group):  # SIGKILL cannot be refused: this ends promptly
            time.sleep(0.05)

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()[-chars:]


def _signal_group(group: int, sig: int) -> bool:
    """Send `sig` to the process group; False if no process of it is left."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return False
    return True


def _group_alive(group: int) -> bool:
    """Whether a process of the group is left, zombies aside (they hold no memory and wait only
    for their parent). Without /proc: whether the group can still be signalled."""
    if not os.path.isdir("/proc/self"):
        return _signal_group(group, 0)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:  # it ended while we looked
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def default_python() -> str:
    return os.environ.get("MEGATRON_RMT_VLLM_PYTHON") or sys.executable


def on_gpu(device: str) -> bool:
    if device != "auto":
        return device == "gpu"
    return shutil.which("nvidia-smi") is not None  # the server's GPU, not this process's torch


def server_command(
    model: str,
    host: str,
    port: int,
    python: str,
    gpu: bool,
    api_key: str | None,
    extra: list,
    weight_transfer: str | None = None,
) -> list[str]:
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--host", host, "--port", str(port), "--logprobs-mode", "processed_logprobs"]
    if not gpu:
        cmd += CPU_ARGS
    if api_key:  # the key itself goes by environment (server_env)
        cmd += ["--middleware", "rmt_key_guard.KeyGuard"]
    if weight_transfer:
        cmd += ["--weight-transfer-config", json.dumps({"backend": weight_transfer})]
    return cmd + list(extra)


def server_env(gpu: bool, base: dict, api_key: str | None = None, cpu_threads: int = 1) -> dict:
    """The server's environment; on CPU `cpu_threads` OpenMP threads (1 where it shares the
    cores with a trainer, as in the tests)."""
    env = dict(base, VLLM_SERVER_DEV_MODE="1")
    if not gpu:
        env.update(CPU_ENV, OMP_NUM_THREADS=str(cpu_threads))
        if "LD_PRELOAD" in CPU_ENV and base.get("LD_PRELOAD"):  # the caller's preloads too
            env["LD_PRELOAD"] = f"{CPU_ENV['LD_PRELOAD']}:{base['LD_PRELOAD']}"
    if api_key:  # read by vLLM's /v1 check and by rmt_key_guard, which guards the rest
        env["VLLM_API_KEY"] = api_key
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [KEY_GUARD_DIR, base.get("PYTHONPATH")]))
    return env


def _die_with_this_thread():
    """A preexec_fn (Linux) making the child receive SIGTERM when the calling thread ends; None
    elsewhere. libc is loaded here, before the fork: the child only calls into it."""
    if (
        not sys.platform.startswith("linux")
        or threading.current_thread() is not threading.main_thread()
    ):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm():
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def start_server(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    api_key: str | None = None,
    python: str | None = None,
    device: str = "auto",
    extra_args: tuple = (),
    startup_timeout: float = 300.0,
    log_path: str | None = None,
    weight_transfer: str | None = None,
    cpu_threads: int = 1,
) -> ServerHandle:
    """Launch the server and return once /health answers; raises with the log tail if it dies
    or does not become healthy within `startup_timeout` seconds."""
    gpu = on_gpu(device)
    api_key = api_key or None
    port = port or _free_port(host)
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
        os.close(fd)
    cmd = server_command(
        model, host, port, python or default_python(), gpu, api_key, extra_args, weight_transfer
    )
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(gpu, os.environ, api_key, cpu_threads),
            start_new_session=True,
            preexec_fn=_die_with_this_thread(),
        )
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    handle = ServerHandle(url, process, log_path, api_key)
    try:
        _wait_healthy(handle, startup_timeout)
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_healthy(handle: ServerHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(
                f"vLLM server exited with {handle.process.returncode}:\n{handle.log_tail()}"
            )
        request = urllib.request.Request(handle.url + "/health")
        if handle.api_key:
            request.add_header("Authorization", f"Bearer {handle.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:  # not listening yet
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vLLM server not healthy after {timeout:.0f} s:\n{handle.log_tail()}")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def advertised_url(host: str, local_url: str) -> str:
    """The URL trainers on other nodes use: a server bound to every interface is named by this
    machine's fully qualified name, not the loopback address it is health-checked on."""
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"http://{host}:{local_url.rsplit(':', 1)[1]}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument(
        "--host", default="127.0.0.1", help="0.0.0.0: reachable from trainers on other nodes"
    )
    p.add_argument(
        "--advertise-host",
        help="host name in the printed URL (default: --host, or this machine's name for 0.0.0.0)",
    )
    p.add_argument("--port", type=int, help="default: a free port")
    p.add_argument(
        "--api-key", default=os.environ.get(KEY_ENV),
        help=f"require this bearer key on every route (default ${KEY_ENV})",
    )  # fmt: skip
    p.add_argument("--python", help="interpreter with vLLM (default $MEGATRON_RMT_VLLM_PYTHON)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--log", help="server log file (default: a temporary file)")
    p.add_argument(
        "--weight-transfer", choices=["gloo", "nccl"],
        help="accept in-memory weight updates over this backend (the trainer's --weight-transfer)",
    )  # fmt: skip
    p.add_argument(
        "--cpu-threads", type=int, default=1,
        help="CPU server: OpenMP threads (more when the server has cores of its own)",
    )  # fmt: skip
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    handle = start_server(
        args.model, host=args.host, port=args.port, api_key=args.api_key, python=args.python,
        device=args.device, extra_args=tuple(extra), startup_timeout=args.startup_timeout,
        log_path=args.log, weight_transfer=args.weight_transfer, cpu_threads=args.cpu_threads,
    )  # fmt: skip
    url = advertised_url(args.advertise_host or args.host, handle.url)
    print(f"vLLM rollout server ready: {url} (log {handle.log_path})", flush=True)

    def _stop(signum, frame):
        # Only leave the wait below: stopping here, inside the handler, would wait on the
        # process while the interrupted `wait` still holds Popen's lock (a deadlock).
        raise SystemExit(0)

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        handle.process.wait()  # the server ending on its own ends the launcher too
    finally:
        handle.stop()
    sys.exit(handle.process.returncode)


if __name__ == "__main__":
    main()
