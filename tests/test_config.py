"""Config parsing: defaults, YAML presets, flag overrides, and the validation messages."""

import glob
import os
import re

import pytest
import yaml

from megatron_rmt.config import ConfigError, from_yaml_text, parse, to_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_flags_use_megatron_names_and_override_yaml(tmp_path):
    path = write(tmp_path, "model:\n  hidden_size: 128\n  num_layers: 4\noptim:\n  lr: 0.001\n")
    cfg = parse(
        [
            "--config",
            path,
            "--num-layers",
            "6",
            "--tensor-model-parallel-size",
            "2",
            "--data-path",
            "0.7",
            "a",
            "0.3",
            "b",
            "--tokenizer-model",
            "tok",
            "--no-untie-embeddings-and-output-weights",
        ],
        world_size=2,
    )
    assert cfg.model.hidden_size == 128  # from the file
    assert cfg.model.num_layers == 6  # flag wins
    assert cfg.optim.lr == 0.001
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.data.data_path == ["0.7", "a", "0.3", "b"]
    assert cfg.model.untie_embeddings_and_output_weights is False


def test_config_is_frozen_and_round_trips_through_yaml():
    cfg = parse([], world_size=1)
    with pytest.raises(AttributeError):
        cfg.model.hidden_size = 3
    assert from_yaml_text(to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    "flags,world,message",
    [
        (
            [
                "--num-attention-heads",
                "6",
                "--num-query-groups",
                "3",
                "--tensor-model-parallel-size",
                "4",
            ],
            4,
            "num_attention_heads 6 not divisible by TP 4",
        ),
        (
            ["--num-query-groups", "1", "--tensor-model-parallel-size", "2"],
            2,
            "num_query_groups 1 not divisible by TP 2",
        ),
        (
            ["--num-layers", "3", "--pipeline-model-parallel-size", "2"],
            2,
            "num_layers 3 not divisible by PP 2",
        ),
        (
            ["--global-batch-size", "6", "--micro-batch-size", "4"],
            1,
            "global_batch_size 6 not divisible by micro_batch_size 4 x DP 1",
        ),
        (
            ["--budget-initial", "800", "--max-response-tokens", "1000"],
            1,
            "below 2*B_0 + answer_tokens",
        ),
        (["--curriculum-start", "0.5", "0.5", "0.5"], 1, "summing to 1"),
        (["--rpt-max-positions", "-1"], 1, "rpt_max_positions must be >= 0"),
        (["--lr-decay-style", "WSD"], 1, "WSD needs lr_wsd_decay_iters"),
        (["--rollout-url", "http://h:1"], 1, "needs --weight-sync-dir"),
        (
            [
                "--rollout-url",
                "http://h:1",
                "--weight-transfer",
                "gloo",
                "--rollout-timeout",
                "40",
                "--rollout-retries",
                "1",
                "--distributed-timeout-minutes",
                "1",
            ],
            1,
            "rollout_timeout x (rollout_retries + 1) = 80 s must stay 30 s below",
        ),
    ],
)
def test_validation_messages(flags, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(flags, world_size=world)


def test_unknown_key_and_wrong_type_name_the_file(tmp_path):
    bad_key = write(tmp_path, "model:\n  hiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'model.hiden_size'"):
        parse(["--config", bad_key], world_size=1)
    bad_type = write(tmp_path, "optim:\n  train_iters: ten\n", "d.yaml")
    with pytest.raises(ConfigError, match=r"d.yaml: optim.train_iters: expected int, got str"):
        parse(["--config", bad_type], world_size=1)
    bad_section = write(tmp_path, "modle: {}\n", "e.yaml")
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        parse(["--config", bad_section], world_size=1)


def test_unknown_flag_is_rejected():
    with pytest.raises(SystemExit):
        parse(["--hiden-size", "3"], world_size=1)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_parse(path):
    """Each preset is valid on one data-parallel replica of its own TP x PP."""
    par = (yaml.safe_load(open(path)) or {}).get("parallel", {})
    world = par.get("tensor_model_parallel_size", 1) * par.get("pipeline_model_parallel_size", 1)
    cfg = parse(["--config", path], world_size=world)
    assert cfg.model.num_layers > 0


def test_defaults_follow_the_paper():
    r = parse([], world_size=1).rmt
    assert (r.response_cap, r.position_unit, r.match_fold_case) == ("fixed", "document", False)
    paper = parse(["--config", os.path.join(ROOT, "configs", "qwen3_14b.yaml")], world_size=8)
    assert (paper.rmt.response_cap, paper.rmt.position_unit) == ("fixed", "document")
    rpt = os.path.join(ROOT, "configs", "variants", "rpt.yaml")
    r = parse(["--config", rpt], world_size=1).rmt
    assert (r.rmt_variant, r.rollout_temperature, r.max_response_tokens) == ("rpt", 0.8, 8192)


def test_negative_named_switches_turn_on():
    """`--no-load-optim` is a Megatron switch named in the negative: it sets the field True."""
    assert parse(["--no-load-optim"]).checkpoint.no_load_optim is True
    assert parse([]).checkpoint.no_load_optim is False
