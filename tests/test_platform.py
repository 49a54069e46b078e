"""The CPU compatibility layer: active without CUDA, absent with it."""

import subprocess
import sys

import pytest
import torch
from conftest import missing

import megatron_rmt  # noqa: F401  (activates the layer on this CPU machine)
from megatron_rmt import platform


@pytest.fixture(scope="module", autouse=True)
def _cpu_only():
    if torch.cuda.is_available():
        missing("a machine without CUDA", "these check the CPU-only path", ci_has_it=False)


def test_cuda_placements_become_cpu():
    assert platform.is_active()
    assert platform.device() == torch.device("cpu")
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    t = torch.ones(3)
    assert t.cuda() is t and t.to("cuda").device.type == "cpu"
    assert t.type() == "torch.cuda.FloatTensor"  # what Megatron's grad clipping asserts
    assert t.type(torch.float64).dtype == torch.float64  # conversions still work


def test_cuda_rng_state_is_the_cpu_generator():
    torch.cuda.manual_seed(7)
    a = torch.rand(4)
    torch.cuda.manual_seed(7)
    assert torch.equal(a, torch.rand(4))
    state = torch.cuda.get_rng_state()
    b = torch.rand(2)
    torch.cuda.set_rng_state(state)
    assert torch.equal(b, torch.rand(2))


def test_streams_and_events_are_harmless():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda.current_stream().wait_stream(s)
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    torch.cuda.synchronize()


def test_inactive_on_a_cuda_host():
    """With CUDA present the layer must not touch torch: simulate a GPU host in a fresh process."""
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "original = torch.cuda.current_device\n"
        "import megatron_rmt\n"
        "from megatron_rmt import platform\n"
        "assert not platform.is_active()\n"
        "assert torch.cuda.current_device is original\n"
        "from megatron.core.tensor_parallel import random as r\n"
        "assert r._get_cuda_rng_state.__module__ == 'megatron.core.tensor_parallel.random'\n"
        "print('untouched')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "untouched" in out.stdout
