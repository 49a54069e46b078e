"""evaluate.py: the set's levels and sample against a naive recomputation (full-vocabulary
softmax of a plain forward), NTP accuracy against a naive argmax, NTR numbers with a scripted
engine whose answers are known, build-set and run at TP=2 equal to TP=1, file:line errors for
bad input, and the table.
"""

import json
import math

import pytest
import torch
from conftest import GPT2, ROOT
from distributed import spawn

from megatron_rmt import checkpoint, evaluate
from megatron_rmt.evaluation import evalset, forward, report
from megatron_rmt.evaluation.documents import read_documents
from megatron_rmt.jsonl import InputError
from megatron_rmt.rollout.contract import RolloutResult
from megatron_rmt.selection import LEVELS
from megatron_rmt.tokenizer import tokenizer_of

SEQ = 48
MIN_CONTEXT = 4
QUANTILES = (0.5, 0.75, 0.9)  # selection.quantile_thresholds' defaults


def _model_flags(tp=1, pp=1, load=None):
    flags = [
        "--config", f"{ROOT}/configs/tiny_cpu.yaml", *GPT2, "--seq-length", str(SEQ),
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--min-context", str(MIN_CONTEXT),
        "--bucket-mode", "quantile", "--init-method-std", "1.0",
        # short rollouts keep the embedded engine cheap (the budget settings only pass validation)
        "--max-response-tokens", "6", "--budget-initial", "1", "--answer-tokens", "2",
    ]  # fmt: skip
    return flags + (["--load", load] if load else [])


def _held_out(path, n=6):
    with open(f"{ROOT}/corpus/sample_math.jsonl") as src, open(path, "w") as dst:
        for _ in range(n):
            dst.write(src.readline())
    return str(path)


def _evaluate(argv, engine=None):
    args, cfg = evaluate.parse(argv)
    if args.command == "build-set":
        return evaluate.build_set(args, cfg)
    return evaluate.run(args, cfg, engine)


def make_proxy_and_set(tmp):
    """A checkpoint of the random initialisation and a set built with it as the proxy."""
    args, cfg = evaluate.parse(["build-set", "--eval-data", "x", "--output", "x", *_model_flags()])
    tokenizer, model = forward.tokenizer_and_model(cfg)
    checkpoint.save_model(f"{tmp}/proxy", model[0], cfg)
    held = _held_out(f"{tmp}/held.jsonl")
    _evaluate(["build-set", "--eval-data", held, "--output", f"{tmp}/set.jsonl",
               "--per-level", "5", "--sample-seed", "7", *_model_flags(load=f"{tmp}/proxy")])  # fmt: skip
    return evalset.read_set(f"{tmp}/set.jsonl")


def _naive_logits(model, ids):  # [n] -> [n, v] full-vocabulary logits of a plain forward
    tokens = torch.tensor(ids)[None]
    with torch.no_grad():
        return model(tokens, torch.arange(len(ids))[None], None)[0].double()


def naive_set(tmp):
    """Everything build-set decides, recomputed directly: entropies of every candidate, the
    quantile thresholds, levels and the seeded draw; and each position's naive argmax."""
    header, positions = make_proxy_and_set(tmp)
    args, cfg = evaluate.parse(["build-set", "--eval-data", "x", "--output", "x",
                                *_model_flags(load=f"{tmp}/proxy")])  # fmt: skip
    tokenizer, model = forward.tokenizer_and_model(cfg)
    docs = read_documents(f"{tmp}/held.jsonl", tokenizer)
    cands = []  # (doc, offset, entropy) in document order
    for d, ids in enumerate(docs):
        for start in range(0, len(ids) - 1, SEQ):
            window = ids[start : start + SEQ + 1]
            logp = torch.log_softmax(_naive_logits(model[0], window[:-1]), -1)
            entropy = -(logp.exp() * logp).sum(-1)
            for j in range(len(window) - 1):
                if j + 1 >= MIN_CONTEXT and tokenizer.eod not in (window[j], window[j + 1]):
                    cands.append((d, start + j, float(entropy[j])))
    argmax = []
    for p in positions:
        logits = _naive_logits(model[0], p.prefix_ids)[-1, : tokenizer.vocab_size]
        argmax.append(int(logits.argmax()))
    return header, positions, docs, cands, argmax


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalset")
    header, positions, docs, cands, argmax = spawn(naive_set, 1, args=(str(tmp),))[0]
    return tmp, header, positions, docs, cands, argmax


def test_levels_and_sample_match_a_naive_recomputation(built):
    _, header, positions, docs, cands, _ = built
    entropies = torch.tensor([h for _, _, h in cands], dtype=torch.float64)
    thresholds = torch.quantile(entropies, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    assert header["candidates"] == len(cands)
    assert header["thresholds"] == pytest.approx(thresholds, abs=1e-4)
    assert entropies.max() - entropies.min() > 1.0  # a spread worth bucketing
    levels = [sum(h >= t for t in header["thresholds"]) - 1 for h in entropies.tolist()]
    margin = min(abs(h - t) for h in entropies.tolist() for t in header["thresholds"])
    if margin > 1e-4:  # no entropy sits on a threshold, so fp32 vs fp64 cannot flip a level
        assert header["available"] == [levels.count(d) for d in range(3)]
    # The seeded draw: per level, a randperm of that level's candidates in document order.
    gen = torch.Generator().manual_seed(7)
    expected = set()
    for d in range(3):
        pool = [c[:2] for c, lv in zip(cands, levels, strict=True) if lv == d]
        expected |= {pool[i] for i in torch.randperm(len(pool), generator=gen)[:5].tolist()}
    assert {(p.doc, p.offset) for p in positions} == expected
    assert header["sampled"] == [5, 5, 5]
    naive = {c[:2]: (c[2], lv) for c, lv in zip(cands, levels, strict=True)}
    for p in positions:
        entropy, level = naive[p.doc, p.offset]
        assert p.entropy == pytest.approx(entropy, abs=1e-4) and p.level == level
        doc = docs[p.doc]
        start = p.offset - p.offset % SEQ
        assert p.prefix_ids == doc[start : p.offset + 1] and p.target_id == doc[p.offset + 1]
        assert p.continuation_ids[0] == p.target_id


def _with_targets(tmp, positions, argmax):
    """The set with every other position's target replaced by the model's own greedy token,
    so the expected NTP accuracy is far from 0 and known exactly."""
    header, _ = evalset.read_set(f"{tmp}/set.jsonl")
    changed = [
        p if i % 2 else evalset.EvalPosition(**{**vars(p), "target_id": argmax[i]})
        for i, p in enumerate(positions)
    ]
    evalset.write_set(f"{tmp}/set_targets.jsonl", header, changed)
    return changed


def run_ntp(tmp, tp=1, pp=1):
    return _evaluate(["run", "--eval-set", f"{tmp}/set_targets.jsonl", "--output",
                      f"{tmp}/tp{tp}pp{pp}.json", "--samples", "2", "--eval-micro-batch", "3",
                      *_model_flags(tp, pp, load=f"{tmp}/proxy")])  # fmt: skip


@pytest.fixture(scope="module")
def ntp_tp1(built):
    tmp, _, positions, _, _, argmax = built
    changed = _with_targets(tmp, positions, argmax)
    return changed, spawn(run_ntp, 1, args=(str(tmp), 1))[0]


def test_ntp_accuracy_equals_naive_argmax(built, ntp_tp1):
    argmax = built[5]
    changed, results = ntp_tp1
    for d, name in enumerate(LEVELS):
        hits = [argmax[i] == p.target_id for i, p in enumerate(changed) if p.level == d]
        assert results["ntp"][name]["n"] == len(hits) == 5
        assert results["ntp"][name]["accuracy"] == sum(hits) / len(hits)
    assert results["ntp"]["all"]["accuracy"] >= 0.5  # every other target is the greedy token


def sharded_argmax_ok():
    """vocab_parallel_argmax on two TP shards: a tie across shards (the lower id wins, as in
    torch.argmax) and a padding id (7 of a vocabulary of 7 real tokens) that must never win."""
    from megatron.core import parallel_state as ps

    rank = ps.get_tensor_model_parallel_rank()
    full = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    full[0, 1] = full[0, 5] = full[0].max() + 1
    full[1, 7] = 100.0
    got = forward.vocab_parallel_argmax(
        full[:, 4 * rank : 4 * rank + 4], 7, ps.get_tensor_model_parallel_group()
    )
    return torch.equal(got, full[:, :7].argmax(-1))


def layout_build_and_run(tmp, tp, pp):
    argmax_ok = tp == 1 or sharded_argmax_ok()
    _evaluate(["build-set", "--eval-data", f"{tmp}/held.jsonl", "--output",
               f"{tmp}/set_tp{tp}pp{pp}.jsonl", "--per-level", "5", "--sample-seed", "7",
               *_model_flags(tp, pp, f"{tmp}/proxy")])  # fmt: skip
    return argmax_ok, run_ntp(tmp, tp, pp)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_two_ranks_equal_one(built, ntp_tp1, tp, pp):
    """build-set and run on 2 ranks (TP=2, PP=2, or two data-parallel replicas that split the
    positions) give the set and results of one process, and every rank returns those results."""
    tmp = built[0]
    ranks = spawn(layout_build_and_run, 2, tp=tp, pp=pp, args=(str(tmp), tp, pp))
    _, p1 = evalset.read_set(f"{tmp}/set.jsonl")
    _, p2 = evalset.read_set(f"{tmp}/set_tp{tp}pp{pp}.jsonl")
    assert [(p.doc, p.offset, p.level) for p in p2] == [(p.doc, p.offset, p.level) for p in p1]
    assert [p.entropy for p in p2] == pytest.approx([p.entropy for p in p1], rel=1e-4)
    reference = ntp_tp1[1]
    for rank, (argmax_ok, results) in enumerate(ranks):
        assert argmax_ok, rank
        for setting in ("ntp", "ntr"):
            for name in (*LEVELS, "all"):
                a, b = results[setting][name], reference[setting][name]
                for key, value in b.items():
                    assert a[key] == pytest.approx(value, rel=1e-4), (rank, setting, name, key)


class ScriptedEngine:
    """Four answers per prompt: two right when the target is " the", one unreadable, one
    " dog". Records whether every prompt carried the budget sentence."""

    collective = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.budget_in_every_prompt = True

    def sync_weights(self, version):
        pass

    def generate(self, requests):
        out = []
        for r in requests:
            assert r.n == 4
            prompt = self.tokenizer.decode(r.prompt_ids)
            self.budget_in_every_prompt &= "Use exactly 5 tokens" in prompt
            responses = [_ids(self.tokenizer, text) for text in SCRIPT]
            out.append(RolloutResult(responses, [[-1.0] * len(x) for x in responses], 0))
        return out


SCRIPT = [
    " a</think> \\boxed{the}",
    " a</think> \\boxed{ the }",
    " c d e",
    " b</think> \\boxed{dog}",
]
TARGETS = {"easy": [" the", " the"], "medium": [" the", " dog"], "hard": [" cat"]}


def _ids(tokenizer, text):
    return tokenizer.encode(text) + [tokenizer.eod]


def scripted_ntr(tmp):
    _, cfg = evaluate.parse(["run", "--eval-set", "x", "--output", "x", *_model_flags()])
    tokenizer = tokenizer_of(cfg.data)
    positions = []
    for level, targets in enumerate(TARGETS.values()):
        for target in targets:
            prefix = tokenizer.encode("The cat sat on")
            (target_id,) = tokenizer.encode(target)
            positions.append(evalset.EvalPosition(0, len(prefix) - 1, prefix, target_id, target,
                                                  [target_id], 1.0, level))  # fmt: skip
    header = {"vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}
    evalset.write_set(f"{tmp}/scripted.jsonl", header, positions)
    engine = ScriptedEngine(tokenizer)
    results = _evaluate(["run", "--eval-set", f"{tmp}/scripted.jsonl", "--output",
                         f"{tmp}/scripted.json", "--samples", "4", "--budget", "5",
                         "--ntr-batch", "2", *_model_flags()], engine)  # fmt: skip
    lengths = [len(_ids(tokenizer, text)) for text in SCRIPT]
    return results, engine.budget_in_every_prompt, lengths


def test_ntr_with_a_scripted_engine(tmp_path):
    results, budget_seen, lengths = spawn(scripted_ntr, 1, args=(str(tmp_path),))[0]
    ntr = results["ntr"]
    assert budget_seen
    assert ntr["easy"]["accuracy"] == 0.5 and ntr["easy"]["n"] == 2
    assert ntr["medium"]["accuracy"] == 0.375
    assert ntr["hard"]["accuracy"] == 0.0
    assert ntr["all"]["accuracy"] == pytest.approx(1.75 / 5)
    assert ntr["avg"] == pytest.approx((0.5 + 0.375) / 3)
    for name in (*LEVELS, "all"):
        assert ntr[name]["parse_failures"] == 0.25
        assert ntr[name]["response_tokens"] == pytest.approx(sum(lengths) / 4)
        assert ntr[name]["think_tokens"] == pytest.approx((1 + 1 + 3 + 1) / 4)  # "a", "c d e", "b"
    with open(tmp_path / "scripted.json") as fh:
        assert json.load(fh)["ntr"] == ntr


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


HEADER = json.dumps({"header": {"format": evalset.FORMAT}})
GOOD = {"doc": 0, "offset": 1, "prefix_ids": [1, 2], "target_id": 3, "target_text": "c",
        "continuation_ids": [3], "entropy": 0.7, "level": "easy"}  # fmt: skip


@pytest.mark.parametrize(
    "lines,where,what",
    [
        ([HEADER, json.dumps(GOOD), "{oops"], ":3:", "not valid JSON"),
        ([json.dumps(GOOD)], ":1:", "header"),
        ([HEADER, "", json.dumps({**GOOD, "level": "trivial"})], ":3:", "level"),
        (
            [HEADER, json.dumps({k: v for k, v in GOOD.items() if k != "target_id"})],
            ":2:",
            "target_id",
        ),
        ([HEADER, json.dumps({**GOOD, "prefix_ids": [1, "x"]})], ":2:", "prefix_ids"),
        ([HEADER, json.dumps({**GOOD, "offset": 1.5})], ":2:", "offset"),
        ([HEADER], "", "no positions"),
    ],
)
def test_bad_set_files_name_file_and_line(tmp_path, lines, where, what):
    path = _write(tmp_path / "set.jsonl", lines)
    with pytest.raises(InputError, match=what) as e:
        evalset.read_set(path)
    assert str(e.value).startswith(path + where)


def test_bad_documents_and_results_name_file_and_line(tmp_path):
    tok = type("Tok", (), {"encode": staticmethod(lambda text: [1, 2]), "eod": 0})
    docs = _write(tmp_path / "docs.jsonl", ['{"text": "fine"}', "", '{"body": "x"}'])
    with pytest.raises(InputError, match=f"^{docs}:3: no 'text' field"):
        read_documents(docs, tok)
    assert read_documents(docs, tok, limit=1) == [[1, 2]]
    with pytest.raises(InputError, match="neither a JSONL file nor an indexed dataset"):
        read_documents(str(tmp_path / "missing"), tok)
    bad = _write(tmp_path / "r.json", ["{", '  "name": }'])
    with pytest.raises(InputError, match=f"^{bad}:2: not valid JSON"):
        report.read_results(bad)
    other = _write(tmp_path / "o.json", ['{"loss": 1}'])
    with pytest.raises(InputError, match=f"^{other}:1: not a results file"):
        report.read_results(other)


def _result(name, ntp, ntr):
    def table(accs, extra):
        out = {lv: {"n": 2, "accuracy": a, **extra} for lv, a in zip(LEVELS, accs, strict=True)}
        return report._with_avg({**out, "all": {"n": 6, "accuracy": None, **extra}})

    lengths = {"response_tokens": 123.45, "think_tokens": 100.0, "parse_failures": 0.125}
    ntr_extra = {**lengths, "accuracy_sd": 0.25}
    return {"name": name, "ntp": table(ntp, {}), "ntr": ntr and table(ntr, ntr_extra)}


def test_table_renders_the_numbers_it_was_given(tmp_path, capsys):
    """Table 1 shape: a row per model and setting, accuracy % [95% interval]. The intervals,
    by hand: NTP Wilson at n = 2 (k = 1: [9.5, 90.5]); NTP avg +- 1.96 sqrt(sum p(1-p)/2) / 3;
    NTR +- 1.96 * 0.25 / sqrt(2) = 34.6 points, its avg +- 1.96 sqrt(3 * 0.25^2 / 2) / 3 = 20.0."""
    paths = []
    for r in (_result("base", [0.4204, 0.3171, 0.1964], None),
              _result("rmt", [0.5, None, 0.25], [0.125, 0.0, 1.0])):  # fmt: skip
        paths.append(tmp_path / f"{r['name']}.json")
        paths[-1].write_text(json.dumps(r))
    out = tmp_path / "table.md"
    evaluate.main(["table", *map(str, paths), "--output", str(out)])
    printed = capsys.readouterr().out.strip()
    assert out.read_text().strip() == printed
    lines = printed.splitlines()
    assert lines[0] == (
        "| Model | Easy | Medium | Hard | Average | Think len | Resp. len | Unparsed % | Positions |"
    )
    assert lines[2] == (
        "| base (NTP) | 42.04 [6.9, 87.6] | 31.71 [4.1, 83.3] | 19.64 [1.7, 77.5] "
        "| 31.13 [0.0, 67.4] | - | - | - | 6 |"
    )  # no NTR row: base has no NTR results
    assert lines[3] == (
        "| rmt (NTP) | 50.00 [9.5, 90.5] | - | 25.00 [2.7, 80.2] | 37.50 [0.0, 83.3] "
        "| - | - | - | 6 |"
    )
    assert lines[4] == (
        "| rmt (NTR) | 12.50 [0.0, 47.1] | 0.00 [0.0, 34.6] | 100.00 [65.4, 100.0] "
        "| 37.50 [17.5, 57.5] | 100.0 | 123.5 | 12.50 | 6 |"
    )
    assert lines[-1] == report.CAPTION and len(lines) == 7


def _naive_paired_bootstrap(a, b, resamples, seed, ratio=False):
    """The textbook loop: the same index draws as evaluation/paired.py (one generator, one
    [R, n] draw), means by Python sums, the percentile by sorting and linear interpolation."""
    from megatron_rmt.evaluation import paired

    idx = paired.resample_indices(len(a), resamples, seed).tolist()
    stats = []
    for row in idx:
        ma = sum(a[i] for i in row) / len(row)
        mb = sum(b[i] for i in row) / len(row)
        stats.append((mb / ma if ma > 0 else float("inf")) if ratio else mb - ma)
    stats.sort()

    def pct(q):
        pos = q * (len(stats) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(stats) - 1)
        if stats[hi] == float("inf"):
            return stats[lo] if pos == lo else float("inf")
        return stats[lo] + (stats[hi] - stats[lo]) * (pos - lo)

    return [pct(0.025), pct(0.975)]


def test_paired_bootstrap_equals_a_naive_bootstrap_on_fixed_data():
    from megatron_rmt.evaluation import paired

    g = torch.Generator().manual_seed(5)
    a = (torch.rand(60, generator=g) < 0.4).double().tolist()  # NTP: 0/1 per position
    b = (torch.randint(0, 5, (60,), generator=g) / 4).double().tolist()  # NTR pass@1, G = 4
    for statistic in ("difference", "ratio"):
        got = paired.paired_bootstrap(torch.tensor(a), torch.tensor(b), statistic, 2000, seed=3)
        want = _naive_paired_bootstrap(a, b, 2000, 3, ratio=statistic == "ratio")
        assert got["ci95"] == pytest.approx(want, abs=1e-12)
        est = sum(b) / 60 - sum(a) / 60 if statistic == "difference" else sum(b) / sum(a)
        assert got["estimate"] == pytest.approx(est, abs=1e-12)
    one = paired.paired_bootstrap(torch.tensor(a), torch.tensor(b), "difference", 500, seed=9)
    two = paired.paired_bootstrap(torch.tensor(a), torch.tensor(b), "difference", 500, seed=9)
    assert one == two


def test_pairing_narrows_the_interval_of_correlated_sides():
    """Same positions on both sides: b is a with 5% of positions flipped, so the paired
    interval of b - a is far narrower than the two sides' own spreads would give."""
    from megatron_rmt.evaluation import paired

    g = torch.Generator().manual_seed(1)
    a = (torch.rand(300, generator=g) < 0.5).double()
    flip = torch.rand(300, generator=g) < 0.05
    b = torch.where(flip, 1 - a, a)
    lo, hi = paired.paired_bootstrap(a, b, "difference", 4000, seed=0)["ci95"]
    unpaired_half = 1.96 * (2 * 0.25 / 300) ** 0.5  # two independent proportions near 0.5
    assert hi - lo < 0.5 * 2 * unpaired_half
    assert lo <= float(b.mean() - a.mean()) <= hi


def test_compare_needs_the_same_positions_and_renders_intervals(tmp_path):
    from megatron_rmt.evaluation import paired, transfer

    def results(name, ntp, ntr, positions):
        return {"name": name, "eval_set": "/s.jsonl", "ntp": {}, "ntr": {"all": {"parse_failures": 0.0}},
                "per_position": {"positions": positions, "ntp": ntp, "ntr": ntr}}  # fmt: skip

    pos = [[0, i] for i in range(8)]
    a = results("cs", [1, 1, 0, 1, 0, 1, 1, 0], [1, 0.75, 0, 1, 0, 0.5, 1, 0], pos)
    b = results("rmt", [1, 1, 1, 1, 0, 1, 1, 0], [1, 1, 0.25, 1, 0, 1, 1, 0], pos)
    rows = paired.comparisons(a, b, resamples=500)
    assert [r["label"] for r in rows][:2] == ["NTP acc: rmt - cs", "NTR pass@1: rmt - cs"]
    assert rows[0]["estimate"] == pytest.approx(1 / 8)
    text = paired.render(rows)
    assert "| NTP acc: rmt - cs | +12.50 pt |" in text
    with pytest.raises(InputError, match="same set"):
        paired.comparisons(a, results("x", a["per_position"]["ntp"], None, pos[::-1]))
    assert paired.comparisons(a, {**b, "eval_set": "/copy/s.jsonl"}, resamples=10)  # same set
    with pytest.raises(InputError, match="same set"):  # another set at the same positions
        paired.comparisons(a, {**b, "set_header": {"per_level": 3}}, resamples=10)
    r = transfer.row(a, 2.0, 2.0)
    assert r["ratio"] == pytest.approx((4.25 / 8) / (5 / 8)) and r["loss_change"] == 0.0
    assert r["meets"] is True
    assert r["p_true"] is None and "| - | 0.0% |" in transfer.render([r], 2.0)  # no NTP losses
    losses = [0.1, 0.7, 2.5, 0.05, 3.0, 0.4, 0.2, 1.5]
    a["per_position"]["ntp_loss"] = losses
    r = transfer.row(a, 2.0, 2.0)
    p_true = sum(math.exp(-x) for x in losses) / 8  # the T = 1 sampler's pass@1
    assert r["p_true"] == pytest.approx(p_true)
    assert f"| {100 * p_true:.2f}% ({p_true / (5 / 8):.3f}) |" in transfer.render([r], 2.0)
    table = transfer.render([r], 2.0, report.parse_flops(["cs=1.5e14"]))
    assert table.splitlines()[0].endswith("| Training FLOPs |") and "| 1.5e+14 |" in table
    assert "FLOPs" not in transfer.render([r], 2.0)
    with pytest.raises(InputError, match="NAME=NUMBER"):
        report.parse_flops(["rmt:3e14"])


def text_loss_and_naive(tmp):
    """evaluation/text_loss.py's held-out loss of a random model, and the naive mean CE of every
    label of every window (plain forward, full-vocabulary log-softmax)."""
    from megatron_rmt.evaluation import text_loss

    args, cfg = evaluate.parse(["build-set", "--eval-data", "x", "--output", "x", *_model_flags()])
    tokenizer, model = forward.tokenizer_and_model(cfg)
    docs = read_documents(_held_out(f"{tmp}/held.jsonl", n=3), tokenizer)
    got = text_loss.text_loss(model, docs, SEQ, 4, tokenizer.eod, tokenizer.vocab_size, 16)
    total, count = 0.0, 0
    for ids in docs:
        for start in range(0, len(ids) - 1, SEQ):
            window = ids[start : start + SEQ + 1]
            logp = _naive_logits(model[0], window[:-1]).log_softmax(-1)
            total -= float(logp[torch.arange(len(window) - 1), window[1:]].sum())
            count += len(window) - 1
    return got, (total / count, count)


def test_held_out_text_loss_equals_a_naive_mean_cross_entropy(tmp_path):
    (loss, n), (want, want_n) = spawn(text_loss_and_naive, 1, args=(str(tmp_path),))[0]
    assert n == want_n
    assert loss == pytest.approx(want, rel=1e-5)
