"""benchmarks/gpu_check.sh refuses cleanly where there is no CUDA: one line, exit status 1."""

import os
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_refuses_without_cuda():
    out = subprocess.run(
        ["bash", f"{ROOT}/benchmarks/gpu_check.sh"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and "no CUDA" in out.stderr
