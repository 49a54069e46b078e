"""Two "nodes" on one machine: two `torchrun --nnodes 2` invocations meeting at a c10d rendezvous
on 127.0.0.1, one trainer rank each (DP = 2 across the nodes), one real vLLM server per node, the
weights pushed in memory (gloo), each node in its own working directory with its own copy of the
data (the trainer builds the index cache on each node itself). After step 0 both trainer ranks
are frozen (SIGSTOP) while node 1's server is killed and started again (that takes longer than a
tiny run's steps), then they go on: the run finishes, the restarted server is brought to the
current weights and is back in the fleet at the last step, and every step samples (the other
server covers while node 1's is stale)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import GPT2, ROOT, missing
from test_vllm import SHAPE, _check_plugin, _vllm_python, build_hf_model

from megatron_rmt.rollout.serve import start_server

pytestmark = pytest.mark.slow
STEPS = 4  # the restarted server is pushed the weights at step 2's sync, serves at step 3
VENV_PATH = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]  # torchrun, python


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(steps):
    """The run's own flags; the servers and the transfer come from the launch script's settings."""
    return [
        "--config", f"{ROOT}/configs/tiny_cpu.yaml", *GPT2, *SHAPE, "--data-path", "data",
        "--budget-initial", "4", "--max-response-tokens", "16", "--group-size", "4",
        "--train-iters", str(steps), "--metrics-file", "metrics.jsonl", "--rollout-timeout", "20",
        "--rollout-retries", "1",
    ]  # fmt: skip


def staged_node(workdir, corpus):
    """A node's working directory with its own copy of the data (no shared filesystem)."""
    os.makedirs(workdir)
    for ext in (".bin", ".idx"):
        shutil.copy(corpus + ext, os.path.join(workdir, "data" + ext))


def _node(workdir, corpus, urls, rdzv_port):
    """One node's trainer, launched as users do (examples/rmt_multinode.sh): its own directory,
    data copy, metrics file and log; the rank that lands on the node without global rank 0
    builds the index cache there itself (node_cache.py)."""
    staged_node(workdir, corpus)
    env = dict(
        os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", NNODES="2",
        NPROC_PER_NODE="1", RDZV_HOST="127.0.0.1", RDZV_PORT=str(rdzv_port),
        RUN_ID="two-node-test", LOCAL_ADDR="127.0.0.1", ROLLOUT_URLS=" ".join(urls),
        WEIGHT_TRANSFER="gloo", PATH=VENV_PATH,
    )  # fmt: skip
    cmd = ["bash", f"{ROOT}/examples/rmt_multinode.sh", *flags(STEPS)]
    log = open(os.path.join(workdir, "train.log"), "w")  # noqa: SIM115 (closed by the test)
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    return proc, log


def _trainer_ranks(nodes):
    """The trainer processes torchrun started (its agents keep running: they would take
    a rendezvous heartbeat missed for a minute as a dead node)."""
    return [c for p, _ in nodes for c in psutil.Process(p.pid).children(recursive=True)]


def _signal(processes, sig):
    for proc in processes:
        proc.send_signal(sig)


def _rows(workdirs):
    """The metrics rank 0 wrote, on whichever node it landed."""
    for d in workdirs:
        path = os.path.join(d, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as fh:
                return [json.loads(line) for line in fh]
    return []


def _weight_tag(url):
    with urllib.request.urlopen(url + "/weight_info", timeout=10) as r:
        return json.loads(r.read())["weight_version"]


def test_two_nodes_lose_a_server_and_get_it_back(tiny_corpus, tmp_path):
    python, reason = _vllm_python()
    if python is None:
        missing("vLLM", f"{reason} (`make vllm-venv` builds .venv-vllm)")
    _check_plugin(python)
    model_dir = str(tmp_path / "hf")
    build_hf_model(model_dir, 50257)
    ports = [_port(), _port()]
    start = lambda port: start_server(model_dir, python=python, port=port, weight_transfer="gloo")  # noqa: E731
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(start, ports))
    urls = [s.url for s in servers]
    rdzv, nodes, dirs = _port(), [], [str(tmp_path / f"node{i}") for i in range(2)]
    try:
        nodes = [_node(d, tiny_corpus, urls, rdzv) for d in dirs]
        deadline = time.monotonic() + 600
        while not _rows(dirs) and time.monotonic() < deadline:  # step 0 done
            assert all(p.poll() is None for p, _ in nodes), "a trainer exited early"
            time.sleep(0.2)
        trainers = _trainer_ranks(nodes)
        _signal(trainers, signal.SIGSTOP)
        servers[1].stop(grace_s=0)  # node 1's server dies ...
        servers[1] = start_server(model_dir, python=python, port=ports[1], weight_transfer="gloo")
        _signal(trainers, signal.SIGCONT)  # ... and is back before the trainers notice
        codes = [p.wait(timeout=600) for p, _ in nodes]
        assert codes == [0, 0], [open(os.path.join(d, "train.log")).read()[-3000:] for d in dirs]
        rows = _rows(dirs)
        assert [m["step"] for m in rows] == list(range(STEPS))
        for m in rows:  # every step sampled: the other server covered while node 1's was stale
            assert m["rollout_failed"] == 0 and m["rl_positions"] > 0 and m["rl_tokens"] > 0
        # The restarted server holds the last version the run pushed, as the other one does ...
        tags = [_weight_tag(u) for u in urls]
        assert tags[0] == tags[1] and tags[0].endswith(f"-v{STEPS}")
        # ... and was back in the fleet at the last step, holding the current weights since the
        # previous sync, so the client spread that step's requests over both servers.
        assert rows[-1]["rollout_servers_down"] == 0
        assert all(not os.path.exists(os.path.join(d, "sync")) for d in dirs)  # no files
    finally:
        for p, log in nodes:
            if p.poll() is None:  # the ranks too: they may not share the agent's group
                _signal([*_trainer_ranks([(p, log)]), psutil.Process(p.pid)], signal.SIGCONT)
                _signal([*_trainer_ranks([(p, log)]), psutil.Process(p.pid)], signal.SIGKILL)
                p.wait()
            log.close()
        for s in servers:
            s.stop()
