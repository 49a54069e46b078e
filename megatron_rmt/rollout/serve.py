"""Start vLLM's OpenAI-compatible server as the rollout service, wait until it answers, stop it.

    python -m megatron_rmt.rollout.serve --model HF_DIR [--host 127.0.0.1] [--port N]
        [--api-key K] [--python PY] [--device auto|cpu|gpu] [--weight-transfer gloo|nccl]
        [-- extra vLLM flags]

Prints the URL to pass as `--rollout-url`, then runs until SIGINT/SIGTERM and stops the server.
Tests and benchmarks use `start_server(...)`, which returns a handle with `.url` and `.stop()`.

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
- `--weight-transfer gloo|nccl` adds `--weight-transfer-config {"backend": ...}`: the server then
  takes in-memory weight updates (`gloo` needs this project installed in the server's venv: it
  is a vLLM plugin, `megatron_rmt_vllm`).
- Bound to 127.0.0.1 unless told otherwise; with `--api-key` every request needs the key.
- The server is a new process group and its output goes to a log file: stopping it ends every
  process it started, and a chatty server can never block on a full pipe.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

CPU_ARGS = [
    "--enforce-eager",
    "--dtype", "float32",
    "--kv-cache-memory-bytes", str(64 << 20),
    "--distributed-executor-backend", "uni",
    "--max-model-len", "1024",
    "--no-enable-chunked-prefill",
]  # fmt: skip
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
}


class ServerHandle:
    """A running server: its `url`, its process and log file; `stop()` ends it."""

    def __init__(self, url: str, process: subprocess.Popen, log_path: str):
        self.url = url
        self.process = process
        self.log_path = log_path

    def stop(self, grace_s: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()[-chars:]


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
    if api_key:
        cmd += ["--api-key", api_key]
    if weight_transfer:
        cmd += ["--weight-transfer-config", json.dumps({"backend": weight_transfer})]
    return cmd + list(extra)


def server_env(gpu: bool, base: dict) -> dict:
    env = dict(base, VLLM_SERVER_DEV_MODE="1")
    if not gpu:
        env.update(CPU_ENV)
    return env


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
) -> ServerHandle:
    """Launch the server and return once /health answers; raises with the log tail if it dies
    or does not become healthy within `startup_timeout` seconds."""
    gpu = on_gpu(device)
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
            env=server_env(gpu, os.environ),
            start_new_session=True,
        )
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    handle = ServerHandle(url, process, log_path)
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
        try:
            with urllib.request.urlopen(handle.url + "/health", timeout=5) as r:
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="default: a free port")
    p.add_argument("--api-key", help="require this bearer key on every request")
    p.add_argument("--python", help="interpreter with vLLM (default $MEGATRON_RMT_VLLM_PYTHON)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--log", help="server log file (default: a temporary file)")
    p.add_argument(
        "--weight-transfer", choices=["gloo", "nccl"],
        help="accept in-memory weight updates over this backend (the trainer's --weight-transfer)",
    )  # fmt: skip
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    handle = start_server(
        args.model, host=args.host, port=args.port, api_key=args.api_key, python=args.python,
        device=args.device, extra_args=tuple(extra), startup_timeout=args.startup_timeout,
        log_path=args.log, weight_transfer=args.weight_transfer,
    )  # fmt: skip
    print(f"vLLM rollout server ready: {handle.url} (log {handle.log_path})", flush=True)

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
