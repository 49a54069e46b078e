"""Convert a Hugging Face checkpoint (or a llama.cpp GGUF file) into a Megatron dist checkpoint.

    python tools/convert_hf_to_megatron.py --load HF_DIR_OR_FILE.gguf --save OUT
    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py --load HF_DIR --save OUT \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

OUT is what the trainer's `--load OUT` reads: `iter_0000000/` (model only, step 0, written by
megatron_rmt.checkpoint) and its tracker, plus `config.yaml` (the resolved run config: model section
from config.json, `--tokenizer-model OUT`), the tokenizer files and the source `hf_config.json`
(which convert_megatron_to_hf.py uses as the template of the exported config).

Deliberate choices:
- The model is built at the requested TP/PP, one process per rank (torchrun), and each rank reads
  only the HF tensors its shard needs, one tensor at a time (safetensors are memory-mapped, GGUF
  tensors dequantised on request): peak memory per rank is its shard plus one HF tensor. A dist
  checkpoint loads at any TP/PP, so one process is enough unless the model does not fit in one.
- No DDP wrapper or optimizer (their gradient buffers and fp32 copies would each be as large as
  the model) and no random initialisation: the bare stage is written by `checkpoint.save_model`.
- Every check that can fail (family, shapes, TP/PP divisibility, files) runs on every rank before
  the first collective, and the output is written to OUT.partial and renamed at the end, so a
  failure leaves nothing at OUT.
"""

import argparse
import json
import os
import sys

import torch.distributed as dist

from megatron_rmt import checkpoint, parallel
from megatron_rmt import config as config_mod
from megatron_rmt.config import Config, DataConfig, ParallelConfig
from megatron_rmt.model import build_model
from megatron_rmt.model.gguf import GGUFCheckpoint
from megatron_rmt.model.hf_config import copy_tokenizer_files, model_config_from_hf
from megatron_rmt.model.hf_mapping import hf_tensor_shapes, load_hf_tensors_into_megatron


class HFDirectory:
    """An HF model directory: `config` (config.json), `shapes` and `get_tensor(name)` over its
    safetensors files, which stay memory-mapped (one tensor is read at a time)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path}: no config.json (expected an HF model directory)")
        with open(config_path) as fh:
            self.config = json.load(fh)
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors weights (.bin is not read)")
        self._files = {}
        self.shapes = {}
        for name in files:
            handle = safe_open(os.path.join(path, name), framework="pt")
            for key in handle.keys():
                self._files[key] = handle
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())
        self.path = path

    def get_tensor(self, name: str):
        return self._files[name].get_tensor(name)

    def save_tokenizer(self, out_dir: str) -> None:
        if not copy_tokenizer_files(self.path, out_dir):
            print(f"warning: {self.path} has no tokenizer files; pass --tokenizer-model yourself")


def open_source(path: str):
    if path.endswith(".gguf"):
        return GGUFCheckpoint(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: neither an HF model directory nor a .gguf file")
    return HFDirectory(path)


def check_tensors(expected: dict, found: dict, tied: bool) -> None:
    """Fail with every missing, unexpected and mis-shaped tensor named."""
    # Tolerated extras: rotary caches of old exports, and lm_head saved although tied.
    ignorable = {n for n in found if n.endswith("rotary_emb.inv_freq")}
    if tied:
        ignorable.add("lm_head.weight")
    problems = [f"missing tensor {n} {expected[n]}" for n in expected if n not in found]
    problems += [
        f"unexpected tensor {n} {found[n]}" for n in found if n not in expected.keys() | ignorable
    ]
    problems += [
        f"{n}: checkpoint has shape {found[n]}, the config implies {want}"
        for n, want in expected.items()
        if n in found and found[n] != want
    ]
    if problems:
        raise ValueError("checkpoint does not match its config:\n  " + "\n  ".join(problems))


def prepare(source, save: str, tp: int, pp: int, world_size: int, divisible_by=128, bf16=False):
    """Every check, before any process group is used: returns the run Config to write."""
    model_cfg = model_config_from_hf(source.config, tp, divisible_by, bf16=bf16)
    cfg = Config(
        model=model_cfg,
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        data=DataConfig(tokenizer_model=os.path.abspath(save)),
    )
    config_mod.validate(cfg, world_size)
    check_tensors(
        hf_tensor_shapes(model_cfg, source.config["vocab_size"]),
        source.shapes,
        tied=not model_cfg.untie_embeddings_and_output_weights,
    )
    if os.path.exists(save):
        raise FileExistsError(f"{save} exists; refusing to overwrite it")
    return cfg


def convert(source, save: str, cfg: Config) -> None:
    """Run on every rank after `parallel.init` at cfg's TP/PP; writes `save` (must not exist)."""
    with checkpoint.staged_dir(os.path.abspath(save)) as partial:
        model = build_model(cfg.model, cfg.model.vocab_size, initialize=False)
        load_hf_tensors_into_megatron(model, cfg.model, source.get_tensor)
        checkpoint.save_model(partial, model, cfg)
        if dist.get_rank() == 0:
            _write_side_files(partial, source, cfg)


def _write_side_files(out: str, source, cfg: Config) -> None:
    with open(os.path.join(out, "config.yaml"), "w") as fh:
        fh.write(config_mod.to_yaml(cfg))
    with open(os.path.join(out, "hf_config.json"), "w") as fh:
        json.dump(source.config, fh, indent=2)
    source.save_tokenizer(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="HF model directory or .gguf file")
    p.add_argument("--save", required=True, help="output checkpoint directory (must not exist)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="store bf16 parameters (default fp32)")
    args = p.parse_args(argv)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if int(os.environ.get("WORLD_SIZE", "1")) != tp * pp:
        sys.exit(f"run under torchrun with --nproc-per-node {tp * pp} (TP {tp} x PP {pp})")
    source = open_source(args.load)
    cfg = prepare(source, args.save, tp, pp, tp * pp, args.make_vocab_size_divisible_by, args.bf16)
    parallel.init(tp=tp, pp=pp)
    try:
        convert(source, args.save, cfg)
    finally:
        parallel.destroy()


if __name__ == "__main__":
    main()
