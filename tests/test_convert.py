"""HF <-> Megatron conversion for Qwen3, Qwen2 and Llama (tied) on tiny random HF models.

One 2-process gloo job runs every layout for all three families: TP2 converts and exports; PP2
loads the TP2 checkpoints (resharding) and exports; TP1 (as two data-parallel replicas) converts
and exports into one file. Logits come through
the trainer's own path (build_trainable + checkpoint.load + Megatron's forward schedule) and are
compared with transformers' on the same tokens; exported safetensors must equal the originals bit
for bit. The layout helpers are checked against naive per-row references.
"""

import dataclasses
import json
import os
import shutil
import sys

import pytest
import torch
from distributed import spawn
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import convert_hf_to_megatron as to_megatron  # noqa: E402
import convert_megatron_to_hf as to_hf  # noqa: E402

from megatron_rmt.config import ConfigError  # noqa: E402
from megatron_rmt.model import hf_mapping  # noqa: E402
from megatron_rmt.model.gguf import unpermute_rope_rows  # noqa: E402
from megatron_rmt.model.hf_config import UnsupportedModelError  # noqa: E402

VOCAB, BATCH, SEQ = 250, 2, 12  # 250 rows: Megatron pads them to 256
FAMILIES = ("qwen3", "qwen2", "llama")


def _hf_model(family: str):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
    )
    if family == "qwen3":  # head_dim differs from hidden/heads, as in real Qwen3 models
        config, cls = tf.Qwen3Config(**common, head_dim=32), tf.Qwen3ForCausalLM
    elif family == "qwen2":
        config, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    else:
        config, cls = tf.LlamaConfig(**common, tie_word_embeddings=True), tf.LlamaForCausalLM
    config.architectures = [cls.__name__]
    torch.manual_seed(FAMILIES.index(family))
    model = cls(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    hf_dirs, reference = {}, {}
    for family in FAMILIES:
        model = _hf_model(family)
        hf_dirs[family] = str(root / f"hf-{family}")
        model.save_pretrained(hf_dirs[family])
        with open(os.path.join(hf_dirs[family], "tokenizer_config.json"), "w") as fh:
            json.dump({"model_max_length": SEQ}, fh)
        with torch.no_grad():
            reference[family] = model(tokens).logits  # [b, s, v]
    return dict(root=str(root), tokens=tokens, hf=hf_dirs, reference=reference)


# ----------------------------------------------------------------------------------------------
# Gloo workers (module level: spawn pickles them by name).


def run_layout(jobs: list, tokens, tp: int, pp: int, failure_dir=None) -> dict:
    """For each (family, hf_dir or None, ckpt, hf_out): convert (if hf_dir), logits, export."""
    logits = {}
    for family, hf_dir, ckpt, hf_out in jobs:
        if hf_dir is not None:
            source = to_megatron.open_source(hf_dir)
            cfg = to_megatron.prepare(source, ckpt, tp, pp, tp * pp)
            to_megatron.convert(source, ckpt, cfg)
        logits[family] = _trainer_logits(ckpt, tokens, tp, pp)
        to_hf.export(ckpt, hf_out, max_shard_bytes=1 << 30)
    if failure_dir is not None:
        logits["failures"] = _failures(jobs[0][1], failure_dir)
    return logits


def _trainer_logits(ckpt: str, tokens, tp: int, pp: int):
    """Logits [b, s, v_padded] of the checkpoint as the trainer loads it (None off the last stage
    and off TP rank 0)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rmt import checkpoint
    from megatron_rmt.build import build_trainable
    from megatron_rmt.config import ParallelConfig, from_yaml_text

    with open(os.path.join(ckpt, "config.yaml")) as fh:
        cfg = from_yaml_text(fh.read())
    layout = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    cfg = dataclasses.replace(cfg, parallel=layout)
    trainable = build_trainable(cfg, cfg.model.vocab_size)
    checkpoint.load(ckpt, trainable)
    store = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter([tokens]),
        model=trainable.model,
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=True,
    )
    if not store or ps.get_tensor_model_parallel_rank() != 0:
        return None
    return store[0]["logits"]


def _forward_step(data_iterator, model):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens = next(data_iterator)
    # Train mode with dropout 0: GPTModel's eval mode asserts on CPU (PLATFORM.md).
    logits = model(tokens, torch.arange(SEQ).expand_as(tokens), None)  # [b, s, v/tp]

    def loss_func(output):
        full = gather_from_tensor_model_parallel_region(output).detach()  # [b, s, v]
        return output.sum() * 0, torch.tensor(1), {"logits": full}

    return logits, loss_func


class _BrokenSource:
    """An HF source whose reads fail half way through the conversion."""

    def __init__(self, source):
        self.config, self.shapes, self._source = source.config, source.shapes, source

    def get_tensor(self, name):
        if ".2." in name:
            raise OSError(f"simulated read error in {name}")
        return self._source.get_tensor(name)


def _failures(hf_dir: str, out: str) -> list[str]:
    """Messages of a conversion failing mid-way and of a tensor with the wrong shape."""
    from megatron_rmt.model import build_model

    source = to_megatron.open_source(hf_dir)
    cfg = to_megatron.prepare(source, out, 1, 1, 1)
    messages = []
    try:
        to_megatron.convert(_BrokenSource(source), out, cfg)
    except OSError as e:
        messages.append(str(e))
    model = build_model(cfg.model, cfg.model.vocab_size)

    def transposed(name):
        t = source.get_tensor(name)
        return t.T if name.endswith("o_proj.weight") else t

    try:
        hf_mapping.load_hf_tensors_into_megatron(model, cfg.model, transposed)
    except ValueError as e:
        messages.append(str(e))
    return messages


# ----------------------------------------------------------------------------------------------
# The three layouts, in one 2-process gloo job (starting processes costs more than converting).


def _jobs(root: str, layout: str, source_layout: str | None, hf: dict) -> list:
    return [
        (
            f,
            hf[f] if source_layout is None else None,
            os.path.join(root, f"ckpt-{f}-{source_layout or layout}"),
            os.path.join(root, f"out-{f}-{layout}"),
        )
        for f in FAMILIES
    ]


def all_layouts(root: str, hf: dict, tokens) -> dict:
    """TP2 converts; PP2 reshards the TP2 checkpoints on load; TP1 (two data-parallel replicas)
    converts again. Every layout exports. Returns {layout: logits} where this rank has them."""
    from megatron.core import parallel_state as ps

    out = {"tp2": run_layout(_jobs(root, "tp2", None, hf), tokens, 2, 1)}
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(pipeline_model_parallel_size=2)
    out["pp2"] = run_layout(_jobs(root, "pp2", "tp2", hf), tokens, 1, 2)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel()
    failure_dir = os.path.join(root, "failed")
    out["tp1"] = run_layout(_jobs(root, "tp1", None, hf), tokens, 1, 1, failure_dir)
    return out


@pytest.fixture(scope="module")
def layouts(work):
    ranks = spawn(all_layouts, 2, tp=2, args=(work["root"], work["hf"], work["tokens"]))
    merged = {}
    for name in ("tp1", "tp2", "pp2"):  # each layout's logits live on its last stage's TP rank 0
        have = [r[name] for r in ranks if r[name]["qwen3"] is not None]
        assert len(have) == (2 if name == "tp1" else 1), name  # TP1 runs as two replicas
        merged[name] = have
    return merged


@pytest.fixture(params=["tp1", "tp2", "pp2"])
def layout(request, layouts):
    return request.param, layouts[request.param]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(work, layout, family):
    name, per_rank = layout
    for logits in per_rank:  # both replicas at TP1
        got = logits[family]
        assert got.shape == (BATCH, SEQ, 256), name
        torch.testing.assert_close(got[..., :VOCAB], work["reference"][family], atol=1e-4, rtol=0)


def _safetensors(folder: str) -> dict:
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(work, layout, family):
    name, _ = layout
    original = _safetensors(work["hf"][family])
    exported = _safetensors(os.path.join(work["root"], f"out-{family}-{name}"))
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key], tensor), key


def test_export_loads_in_transformers_with_its_files(work, layouts):
    from transformers import AutoModelForCausalLM

    out = os.path.join(work["root"], "out-qwen3-tp1")
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    assert os.listdir(out).count("model.safetensors") == 1
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(work["tokens"]).logits
    assert torch.equal(logits, work["reference"]["qwen3"])
    # PP2 writes one file per stage, named the HF way, with an index over both.
    out = os.path.join(work["root"], "out-llama-pp2")
    with open(os.path.join(out, "model.safetensors.index.json")) as fh:
        files = set(json.load(fh)["weight_map"].values())
    assert files == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert not os.path.exists(out + ".partial")


def test_checkpoint_directory_is_what_the_trainer_reads(work, layouts):
    ckpt = os.path.join(work["root"], "ckpt-llama-tp1")
    from megatron_rmt.config import parse

    cfg = parse(["--config", os.path.join(ckpt, "config.yaml")], world_size=1)
    assert cfg.model.model_family == "llama"
    assert not cfg.model.untie_embeddings_and_output_weights
    assert cfg.model.vocab_size == 256
    assert cfg.data.tokenizer_model == ckpt
    for name in ("hf_config.json", "tokenizer_config.json", "latest_checkpointed_iteration.txt"):
        assert os.path.isfile(os.path.join(ckpt, name)), name


def test_failure_leaves_no_output_and_shapes_are_named(work, layouts):
    for replica in layouts["tp1"]:
        broken, mismatch = replica["failures"]
        assert "simulated read error" in broken
        assert "self_attn.o_proj.weight" in mismatch and "(128, 64)" in mismatch
        assert "(64, 128)" in mismatch
    out = os.path.join(work["root"], "failed")
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


# ----------------------------------------------------------------------------------------------
# Errors found before any process group starts.


def _copy_hf(work, family, tmp_path):
    dst = str(tmp_path / family)
    shutil.copytree(work["hf"][family], dst)
    return dst


def test_unknown_architecture(work, tmp_path):
    hf = _copy_hf(work, "qwen3", tmp_path)
    with open(os.path.join(hf, "config.json")) as fh:
        config = json.load(fh)
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    with open(os.path.join(hf, "config.json"), "w") as fh:
        json.dump(config, fh)
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM"):
        to_megatron.prepare(to_megatron.open_source(hf), str(tmp_path / "out"), 1, 1, 1)


def test_tp_must_divide_heads(work, tmp_path):
    source = to_megatron.open_source(work["hf"]["qwen2"])
    with pytest.raises(ConfigError, match="num_query_groups 2 not divisible by TP 4"):
        to_megatron.prepare(source, str(tmp_path / "out"), 4, 1, 4)


def test_shape_mismatch_names_tensor_and_shapes(work, tmp_path):
    hf = _copy_hf(work, "llama", tmp_path)
    path = os.path.join(hf, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(tensors, path)
    with pytest.raises(ValueError) as err:
        to_megatron.prepare(to_megatron.open_source(hf), str(tmp_path / "out"), 1, 1, 1)
    assert "model.layers.1.mlp.up_proj.weight: checkpoint has shape (95, 64)" in str(err.value)
    assert "(96, 64)" in str(err.value)


def test_missing_files_and_existing_output(work, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        to_megatron.open_source(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        to_megatron.open_source(str(tmp_path / "absent.gguf"))
    hf = _copy_hf(work, "qwen3", tmp_path)
    os.remove(os.path.join(hf, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        to_megatron.open_source(hf)
    with pytest.raises(FileExistsError):
        to_megatron.prepare(to_megatron.open_source(work["hf"]["qwen3"]), str(tmp_path), 1, 1, 1)
    with pytest.raises(FileNotFoundError, match="not a Megatron checkpoint"):
        to_hf.load_model(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Layout helpers against naive per-row references.


def test_fused_qkv_rows_follow_query_groups():
    heads, groups, d, h = 6, 2, 3, 5
    q, k, v = torch.randn(heads * d, h), torch.randn(groups * d, h), torch.randn(groups * d, h)
    per_group = heads // groups
    rows = []  # Megatron's definition: for each group, its q heads, then its k head, then v
    for g in range(groups):
        for j in range(per_group):
            rows.append(q[(g * per_group + j) * d : (g * per_group + j + 1) * d])
        rows += [k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
    naive = torch.cat(rows)
    for tp in (1, 2):
        fused = torch.cat([hf_mapping.qkv_shard(q, k, v, groups, r, tp) for r in range(tp)])
        assert torch.equal(fused, naive)
    back = hf_mapping.split_qkv(naive, groups, heads)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))


def test_gate_up_shards_and_vocab_padding():
    gate, up, tp = torch.randn(8, 3), torch.randn(8, 3), 2
    shards = [hf_mapping.gate_up_shard(gate, up, r, tp) for r in range(tp)]
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))
    g, u = hf_mapping.split_gate_up(torch.cat(shards), tp)
    assert torch.equal(g, gate) and torch.equal(u, up)
    w = torch.randn(10, 3)
    last = hf_mapping.vocab_shard(w, 16, 1, 2)  # rows 8..15 of which 10..15 are padding
    assert torch.equal(last[:2], w[8:]) and not last[2:].any()


def test_unpermute_undoes_llama_cpp_rope_permutation():
    heads, d, h = 3, 8, 4
    w = torch.randn(heads * d, h)
    permuted = torch.empty_like(w)
    for head in range(heads):  # llama.cpp: row 2i+j of a head holds HF row j*d/2 + i
        for i in range(d // 2):
            for j in range(2):
                permuted[head * d + 2 * i + j] = w[head * d + j * d // 2 + i]
    assert torch.equal(unpermute_rope_rows(permuted, heads), w)
