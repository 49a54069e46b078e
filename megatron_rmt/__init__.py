"""megatron_rmt: Reinforcement Mid-Training on Megatron-Core.

Importing the package installs the CPU compatibility layer when CUDA is absent (see platform.py),
so Megatron-Core runs unmodified on a CPU-only machine; on a GPU host it does nothing.
"""

from megatron_rmt import platform

platform.activate()

__version__ = "0.1.0"
