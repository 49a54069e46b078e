"""Device choice and the CPU compatibility layer that lets unmodified Megatron-Core run without CUDA.

Megatron-Core assumes CUDA in about 150 places: ``device="cuda"`` and bare device ints in factory
calls, ``.cuda()``, ``torch.cuda.current_device/synchronize/Stream/Event``, the CUDA RNG tracker and
an assertion that gradients are ``torch.cuda.FloatTensor``. Rather than fork Megatron, ``activate()``
makes those calls mean "the CPU" for the whole process:

* a ``TorchFunctionMode`` that rewrites CUDA devices (strings, ``torch.device`` and bare ints) to
  CPU, makes ``.cuda()`` and ``.pin_memory()`` identities and reports float tensors' ``.type()``
  with the CUDA name Megatron's gradient clipping asserts on;
* plain stand-ins for the ``torch.cuda`` functions Megatron calls (devices, streams, events,
  memory statistics, RNG state backed by the default CPU generator);
* the tensor-parallel RNG tracker's get/set state pointed at the CPU generator.

It is a no-op when CUDA is available, so GPU runs use Megatron exactly as shipped. It must run in
every process before the first Megatron call; ``import megatron_rmt`` does that, which covers
torchrun workers and spawned test processes alike.
"""

import contextlib
import warnings

import torch
from torch.overrides import TorchFunctionMode

_active_mode = None


def cuda_available() -> bool:
    """True on a GPU host; the compatibility layer stays off there."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on: its local GPU, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_active() -> bool:
    """Whether the CPU compatibility layer is installed in this process."""
    return _active_mode is not None


def activate() -> None:
    """Install the CPU compatibility layer once per process, only when CUDA is absent."""
    global _active_mode
    if _active_mode is not None or cuda_available():
        return
    # Without TE/apex Megatron warns on import that it uses its torch fallbacks: expected here.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    _build_dynamo_rule_map()
    _patch_megatron_rng()
    _patch_torch_cuda()
    _active_mode = _CudaAsCpuMode()
    _active_mode.__enter__()  # stays entered for the life of the process


def _build_dynamo_rule_map() -> None:
    """Build torch.compile's table of tracing rules now, from the real torch.cuda, when it is not
    built yet (it is built once, on first use; see `_own` for why the patches keep it sound
    either way)."""
    from torch._dynamo import trace_rules

    trace_rules.get_torch_obj_rule_map()


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


_IDENTITY_METHODS = {torch.Tensor.cuda, torch.Tensor.pin_memory}


class _CudaAsCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU on every torch call made while it is entered."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _IDENTITY_METHODS:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: everything on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_cpu_rng_state(state, *args, **kwargs) -> None:
    torch.default_generator.set_state(state)


def _seed_cpu(seed, *args, **kwargs) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    def zero(*args, **kwargs):
        return 0

    def none(*args, **kwargs):
        return None

    def stream(*args, **kwargs):
        return _NoOpStream()

    replacements = {
        "current_device": zero,
        "set_device": none,
        "synchronize": none,
        "empty_cache": none,
        "Stream": _NoOpStream,
        "Event": _NoOpStream,
        "current_stream": stream,
        "default_stream": stream,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "memory_allocated": zero,
        "max_memory_allocated": zero,
        "memory_reserved": zero,
        "reset_peak_memory_stats": none,
        "get_rng_state": _cpu_rng_state,
        "set_rng_state": _set_cpu_rng_state,
        "manual_seed": _seed_cpu,
        "manual_seed_all": _seed_cpu,
    }
    for name, value in replacements.items():
        setattr(torch.cuda, name, _own(value, name))
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state  # one object, as in torch
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    for name in ("range_push", "range_pop", "mark"):
        setattr(torch.cuda.nvtx, name, _own(none, name))
    torch.cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _own(value, name: str):
    """`value` as an object of its own for the name `name`. torch.compile (Megatron's
    `jit_fuser`) gives each torch function a tracing rule in a table built on first use; built
    after these patches, it would meet one stand-in under two names with different rules
    (`synchronize`, `set_device`) and assert. One object per name keeps that table consistent
    whenever it is built."""
    if isinstance(value, type):
        return type(name, (value,), {})

    def stand_in(*args, **kwargs):
        return value(*args, **kwargs)

    stand_in.__name__ = stand_in.__qualname__ = name
    return stand_in


def _patch_megatron_rng() -> None:
    """Point the tensor-parallel RNG tracker at the CPU generator (it forks CUDA states)."""
    try:
        from megatron.core.tensor_parallel import random as mp_random
    except ImportError:  # megatron-core not installed: nothing to patch
        return
    mp_random._get_cuda_rng_state = _cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    # Activation recompute re-runs layer forwards inside backward, which the autograd call runs
    # with this mode switched off (a mode's handler does): switch it back on there.
    for fn in (mp_random.CheckpointFunction, mp_random.CheckpointWithoutOutputFunction):
        fn.backward = staticmethod(_with_mode(fn.backward))


def _with_mode(backward):
    def run(ctx, *args):
        with _active_mode:
            return backward(ctx, *args)

    return run
