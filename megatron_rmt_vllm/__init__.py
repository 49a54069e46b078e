"""The server side of megatron_rmt's in-memory weight transfer: a vLLM plugin.

vLLM calls `register()` (the `vllm.general_plugins` entry point in setup.py) in every process it
starts; it adds the `gloo` backend to vLLM's weight-transfer registry, so a server started with
`--weight-transfer-config '{"backend": "gloo"}'` receives the trainer's weights over a
torch.distributed gloo group through the same routes as the built-in `nccl` backend.

This package is separate from `megatron_rmt` on purpose: importing `megatron_rmt` installs the
CPU compatibility layer for Megatron-Core, which must never run inside a vLLM server. It imports
only torch here, and vLLM only in `gloo_engine` (the server's side).
"""


def register() -> None:
    """vLLM may load plugins more than once per process: registering twice is not an error."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(
            "gloo", "megatron_rmt_vllm.gloo_engine", "GlooWeightTransferEngine"
        )
    except ValueError:  # already registered in this process
        pass
