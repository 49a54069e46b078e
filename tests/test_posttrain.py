"""Math post-training: the problem stream (parsing, DP shares, epochs, resume) and GRPO steps on
gloo with a scripted engine whose even samples give the gold answer and odd ones a wrong one."""

import json

import pytest
import torch
from conftest import GPT2
from distributed import spawn
from test_train import _read, config_dir, save_initial

from megatron_rmt import posttrain
from megatron_rmt.math_data import ProblemStream, read_problems
from megatron_rmt.rollout.contract import RolloutResult
from megatron_rmt.tokenizer import tokenizer_of

ASSETS = f"{config_dir()}/../../shared/assets/math"


def test_reads_the_bundled_math_and_gsm8k_files():
    math = read_problems(f"{ASSETS}/math500.jsonl")
    gsm = read_problems(f"{ASSETS}/gsm8k_test.jsonl")
    assert len(math) == 500 and len(gsm) == 1319
    assert math[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert gsm[0].text.startswith("Janet") and gsm[0].answer == "18"


@pytest.mark.parametrize(
    "line,expected",
    [("{not json", "not valid JSON"), ('{"problem": "x"}', '"answer"'), ("[1, 2]", "object")],
)
def test_bad_lines_name_file_and_line(tmp_path, line, expected):
    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"p.jsonl:2: .*{expected}"):
        read_problems(str(path))


def test_stream_shares_epochs_and_resume():
    problems = read_problems(f"{ASSETS}/math500.jsonl")[:10]
    ranks = [ProblemStream(problems, 4, r, 2, seed=3) for r in range(2)]
    steps = [[next(s) for s in ranks] for _ in range(5)]  # 20 problems: two epochs of 10
    flat = [p for a, b in steps for p in a + b]
    assert sorted(p.text for p in flat[:10]) == sorted(p.text for p in problems)
    assert sorted(p.text for p in flat[10:]) == sorted(p.text for p in problems)
    assert flat[:10] != flat[10:]  # each epoch has its own order
    resumed = ProblemStream(problems, 4, 1, 2, seed=3, consumed_samples=8)
    assert next(resumed) == steps[2][1]


class GoldOrNot:
    """Even samples answer 7 (the gold answer of every problem here), odd ones 8."""

    collective = False

    def __init__(self, tokenizer):
        self.tokenizer, self.version = tokenizer, 0

    def sync_weights(self, version):
        self.version = version

    def generate(self, requests):
        right = self.tokenizer.encode(" so</think> \\boxed{7}") + [self.tokenizer.eod]
        wrong = self.tokenizer.encode(" hmm</think> \\boxed{8}") + [self.tokenizer.eod]
        out = []
        for r in requests:
            responses = [right if i % 2 == 0 else wrong for i in range(r.n)]
            out.append(RolloutResult(responses, [[-1.0] * len(x) for x in responses], self.version))
        return out


def run_posttrain(argv):
    cfg = posttrain.config.parse(argv)
    d = cfg.data
    tok = tokenizer_of(d)
    posttrain.main(argv, engine=GoldOrNot(tok))


@pytest.fixture(scope="module")
def sevens(tmp_path_factory):
    path = tmp_path_factory.mktemp("math") / "sevens.jsonl"
    rows = [{"problem": f"What is {i} + {7 - i}?", "answer": "7"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _argv(sevens, tmp, tp=1, pp=1, extra=()):
    return [
        "--config", f"{config_dir()}/tiny_cpu.yaml", f"{config_dir()}/posttrain_tiny_cpu.yaml",
        *GPT2, "--prompt-data", sevens, "--num-layers", "2", "--train-iters", "2",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--metrics-file", str(tmp / f"m{tp}{pp}.jsonl"), "--lr", "1e-3", *extra,
    ]  # fmt: skip


def test_grpo_steps_on_math_problems(sevens, tmp_path):
    ckpt, initial = str(tmp_path / "ckpt"), str(tmp_path / "initial")
    spawn(save_initial, 1, args=(_argv(sevens, tmp_path), initial))
    spawn(
        run_posttrain, 1, args=(_argv(sevens, tmp_path, extra=["--load", initial, "--save", ckpt]),)
    )
    one = _read(str(tmp_path / "m11.jsonl"))
    assert [m["step"] for m in one] == [0, 1]
    for m in one:
        assert m["match_acc"] == 0.5 and m["reward"] == 0.5 and m["zero_adv_share"] == 0
        assert m["rl_tokens_trained"] > 0 and m["grad_norm"] > 0 and m["ntp_tokens"] == 0
    assert one[0]["rl_loss"] != one[1]["rl_loss"] or one[0]["grad_norm"] != one[1]["grad_norm"]
    spawn(run_posttrain, 2, pp=2, args=(_argv(sevens, tmp_path, pp=2, extra=["--load", initial]),))
    for a, b in zip(_read(str(tmp_path / "m12.jsonl")), one, strict=True):
        for key in ("rl_loss", "grad_norm", "response_len"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    # The checkpoint holds the data position: a resumed run would start at problem 8.
    state = torch.load(f"{ckpt}/iter_0000002/common.pt", weights_only=False)
    assert state["progress"] == {
        "step": 2,
        "consumed_samples": 8,
        "totals": {
            "rollout_failures": 0,
            "flops_total": int(one[0]["flops"]) + int(one[1]["flops"]),
        },
        "pending_rollouts": None,  # post-training is on-policy: nothing in flight
    }
