"""`examples/rmt_slurm.sbatch` run for real on one machine: `srun` and `scontrol` are stand-ins
that run each step here and name two "nodes" (127.0.0.1 trains, localhost serves). The script
starts the vLLM server under its restart loop, waits until it answers, and launches the trainer
through `examples/rmt_multinode.sh` with the server's URL and the in-memory (gloo) transfer; the
run trains with rewards from the pushed weights. What SLURM itself does (placing steps on other
nodes, killing them at the job's end) is not exercised."""

import json
import os
import signal
import subprocess

import pytest
from conftest import ROOT, missing
from test_two_node import VENV_PATH, _port, _weight_tag, flags, staged_node
from test_vllm import _check_plugin, _vllm_python, build_hf_model

pytestmark = pytest.mark.slow

SRUN = """#!/usr/bin/env bash
# srun on one machine: drop srun's own options, run the step here
while [[ $# -gt 0 && $1 == --* ]]; do
  if [[ $1 == *=* ]]; then shift; else shift 2; fi
done
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || { echo "scontrol stand-in: $*" >&2; exit 1; }
printf '127.0.0.1\\nlocalhost\\n'
"""


def _stand_ins(bin_dir):
    os.makedirs(bin_dir)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        path = os.path.join(bin_dir, name)
        with open(path, "w") as fh:
            fh.write(text)
        os.chmod(path, 0o755)


def test_the_slurm_script_starts_a_server_and_trains_against_it(tiny_corpus, tmp_path):
    python, reason = _vllm_python()
    if python is None:
        missing("vLLM", f"{reason} (`make vllm-venv` builds .venv-vllm)")
    _check_plugin(python)
    model_dir, work, bin_dir = str(tmp_path / "hf"), str(tmp_path / "job"), str(tmp_path / "bin")
    build_hf_model(model_dir, 50257)
    staged_node(work, tiny_corpus)
    _stand_ins(bin_dir)
    env = dict(
        os.environ, PATH=bin_dir + os.pathsep + VENV_PATH, SLURM_JOB_NODELIST="node[0-1]",
        SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=ROOT, TRAIN_NODES="1", SERVED_MODEL=model_dir,
        SERVER_TP="1", SERVER_PORT=str(_port()), RDZV_PORT=str(_port()), GPUS_PER_NODE="1",
        WEIGHT_TRANSFER="gloo", VLLM_PYTHON=python, SERVER_WAIT_S="300", LOCAL_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
    )  # fmt: skip
    log_path = os.path.join(work, "job.out")  # not a pipe: the server outlives the script
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            ["bash", f"{ROOT}/examples/rmt_slurm.sbatch", *flags(2)], cwd=work, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            job.wait(timeout=600)
            url = f"http://localhost:{env['SERVER_PORT']}"
            tag = _weight_tag(url) if job.returncode == 0 else None  # the server still runs
        finally:  # the server's restart loop and launcher (SLURM would end the job's steps)
            os.killpg(job.pid, signal.SIGTERM)
            job.wait()
    with open(log_path) as fh:
        out = fh.read()
    assert job.returncode == 0, out[-4000:]
    assert f"rollout server ready: {url}" in out
    assert tag.endswith("-v2")  # it holds the weights of the run's last sync (v0 at set-up)
    with open(os.path.join(work, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert [m["step"] for m in rows] == [0, 1]
    for m in rows:  # every step sampled from the server
        assert m["rollout_failed"] == 0 and m["rl_positions"] > 0 and m["rl_tokens"] > 0
    assert "weight push" not in out  # every sync reached the server in memory
    assert not os.path.exists(os.path.join(work, "sync"))  # no weight files
