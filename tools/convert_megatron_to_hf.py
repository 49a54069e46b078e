"""Convert a Megatron dist checkpoint (the converter's or the trainer's) back to a Hugging Face model
directory: safetensors + config.json + tokenizer files, loadable by `transformers` and vLLM.

    python tools/convert_megatron_to_hf.py --load CKPT --save HF_OUT [--dtype bfloat16]
    torchrun --nproc-per-node 2 tools/convert_megatron_to_hf.py --load CKPT --save HF_OUT \\
        --tensor-model-parallel-size 2

Deliberate choices:
- The checkpoint is read at the requested TP/PP (dist checkpoints reshard on load; one process is
  enough unless the model does not fit), into a bare model (no DDP or optimizer memory).
- Tensors leave through `hf_mapping.megatron_to_hf_tensors`, the same code path the weight sync to
  the rollout service uses, one parameter at a time; TP rank 0 of every pipeline stage writes its
  own layers into safetensors files of about --max-shard-size bytes, streamed a tensor at a time
  (`SafetensorsWriter`), so memory stays at the model plus one tensor. Rank 0 then names the files
  the HF way and writes the index.
- config.json starts from the `hf_config.json` the HF->Megatron converter kept (token ids, chat
  settings survive) and takes every shape from the checkpoint's own config.yaml. Megatron's vocab
  padding is trimmed back to that config's vocab_size.
- Output goes to HF_OUT.partial and is renamed when complete: a failure leaves nothing at HF_OUT.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from megatron_rmt import checkpoint, parallel
from megatron_rmt import config as config_mod
from megatron_rmt.config import ParallelConfig
from megatron_rmt.model import build_model
from megatron_rmt.model.hf_config import copy_tokenizer_files, hf_config_from_model_config
from megatron_rmt.model.hf_mapping import megatron_to_hf_tensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(root: str):
    """(this rank's GPTModel stage with the latest checkpoint under root loaded, its Config)."""
    step = checkpoint.latest_step(root)
    if step is None:
        raise FileNotFoundError(f"{root}: no {checkpoint.TRACKER}; not a Megatron checkpoint")
    path = checkpoint.iteration_dir(root, step)
    with open(os.path.join(path, "config.yaml")) as fh:
        saved = config_mod.from_yaml_text(fh.read())
    layout = ParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
    )
    cfg = dataclasses.replace(saved, parallel=layout)
    config_mod.validate(cfg, dist.get_world_size())  # e.g. TP not dividing the heads, clearly
    vocab = cfg.model.vocab_size or _saved_vocab_rows(path)
    model = build_model(cfg.model, vocab, initialize=False)  # every weight comes from the file
    checkpoint.load_model(root, model)
    return model, cfg


def _saved_vocab_rows(path: str) -> int:
    metadata = dist_checkpointing.load_tensors_metadata(path)
    return metadata["embedding.word_embeddings.weight"].global_shape[0]


def _hf_template(root: str, cfg) -> dict:
    """The source model's config.json if the HF->Megatron converter kept it, else {}."""
    for folder in (root, cfg.data.tokenizer_model):
        if folder and os.path.isfile(os.path.join(folder, "hf_config.json")):
            with open(os.path.join(folder, "hf_config.json")) as fh:
                return json.load(fh)
    return {}


class SafetensorsWriter:
    """One safetensors file written a tensor at a time. The format puts a JSON header (every
    name, dtype, shape and offset) before the data, so the data is streamed to a scratch file and
    the header prepended at close: memory holds one tensor, at the price of writing bytes twice."""

    _DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

    def __init__(self, path: str):
        self.path = path
        self.header, self.nbytes = {}, 0
        self._data = open(path + ".data", "wb")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._data.write(raw.data)
        dtype = self._DTYPES[tensor.dtype]
        self.header[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [self.nbytes, self.nbytes + raw.size],
        }
        self.nbytes += raw.size

    def close(self) -> dict[str, int]:
        """Finish the file; returns {tensor name: bytes}."""
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors does
        with open(self.path, "wb") as out, open(self.path + ".data", "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 << 20)
        os.remove(self.path + ".data")
        return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in self.header.items()}


def write_stage(model, model_cfg, vocab_rows, dtype, out: str, max_shard_bytes: int) -> list:
    """Write this stage's tensors (every TP rank gathers, TP rank 0 of DP replica 0 writes);
    returns [(file name, {tensor name: nbytes})] of the files this rank wrote."""
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    stage = ps.get_pipeline_model_parallel_rank()
    files, current = [], None
    for name, tensor in megatron_to_hf_tensors(model, model_cfg, vocab_rows):
        if not writer:
            continue
        if current is None:
            file_name = f"stage{stage:03d}-{len(files):05d}.safetensors"
            current = SafetensorsWriter(os.path.join(out, file_name))
        current.add(name, tensor.to(dtype))
        if current.nbytes >= max_shard_bytes:
            files.append((os.path.basename(current.path), current.close()))
            current = None
    if current is not None:
        files.append((os.path.basename(current.path), current.close()))
    return files


def name_files(out: str, per_rank_files: list) -> None:
    """Rename the stages' files to HF's model-0000i-of-0000N.safetensors and write the index."""
    files = [f for rank_files in per_rank_files for f in rank_files]
    if len(files) == 1:
        os.replace(os.path.join(out, files[0][0]), os.path.join(out, "model.safetensors"))
        return
    weight_map, total = {}, 0
    for i, (old, sizes) in enumerate(files):
        new = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(os.path.join(out, old), os.path.join(out, new))
        weight_map.update(dict.fromkeys(sizes, new))
        total += sum(sizes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2)


def export(load: str, save: str, dtype: str | None = None, max_shard_bytes: int = 2 << 30):
    """Run on every rank after `parallel.init(tp, pp)`; writes the HF directory `save`."""
    save = os.path.abspath(save)
    if os.path.exists(save):
        raise FileExistsError(f"{save} exists; refusing to overwrite it")
    model, cfg = load_model(load)
    template = _hf_template(load, cfg)
    vocab_rows = template.get("vocab_size")
    dtype = dtype or template.get("torch_dtype") or template.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    with checkpoint.staged_dir(save) as partial:
        files = write_stage(model, cfg.model, vocab_rows, DTYPES[dtype], partial, max_shard_bytes)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, files)
        if dist.get_rank() == 0:
            name_files(partial, per_rank)
            rows = vocab_rows or model.vocab_size
            hf = hf_config_from_model_config(cfg.model, rows, dtype, base=template)
            with open(os.path.join(partial, "config.json"), "w") as fh:
                json.dump(hf, fh, indent=2)
            if not copy_tokenizer_files(load, partial) and cfg.data.tokenizer_model:
                copy_tokenizer_files(cfg.data.tokenizer_model, partial)  # a trainer checkpoint


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="Megatron checkpoint directory (has the tracker)")
    p.add_argument("--save", required=True, help="HF output directory (must not exist)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the source HF config's")
    p.add_argument("--max-shard-size", type=int, default=2 << 30, help="bytes per file")
    args = p.parse_args(argv)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if int(os.environ.get("WORLD_SIZE", "1")) != tp * pp:
        sys.exit(f"run under torchrun with --nproc-per-node {tp * pp} (TP {tp} x PP {pp})")
    parallel.init(tp=tp, pp=pp)
    try:
        export(args.load, args.save, args.dtype, args.max_shard_size)
    finally:
        parallel.destroy()


if __name__ == "__main__":
    main()
