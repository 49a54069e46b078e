"""The RMT trainer end to end on gloo: layouts agree, variants switch what they should, resume
continues exactly, a crash during save keeps the previous checkpoint, and the embedded engine's
log-probs are what the trainer recomputes.

A scripted rollout engine makes the RL signal deterministic: in every group, even samples close
the think block after one token (length reward > 0 for any budget), odd ones never do (reward 0), so every
group has nonzero advantages and the RL pass really trains.
"""

import json
import threading

import pytest
import rl_groups
import torch
from conftest import GPT2
from distributed import spawn

from megatron_rmt import checkpoint, config, launch, loop, parallel, step, train
from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult
from megatron_rmt.tokenizer import tokenizer_of


class ScriptedEngine:
    collective = False  # exercised like a remote service: rank 0 of a replica calls it

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.version = 0

    def sync_weights(self, version):
        self.version = version

    def generate(self, requests):
        good = self.tokenizer.encode(" a</think> \\boxed{x}") + [self.tokenizer.eod]
        bad = self.tokenizer.encode(" a b c d e f g h")
        out = []
        for r in requests:
            responses = [(good if i % 2 == 0 else bad)[: r.max_tokens] for i in range(r.n)]
            logprobs = [[-1.0] * len(x) for x in responses]
            out.append(RolloutResult(responses, logprobs, self.version))
        return out


def _flags(corpus, tp=1, pp=1, iters=2, extra=()):
    return [
        "--config", f"{config_dir()}/tiny_cpu.yaml", *GPT2, "--data-path", corpus,
        "--num-layers", "2", "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp), "--train-iters", str(iters),
        "--budget-initial", "4", "--max-response-tokens", "24", "--lr", "1e-3", *extra,
    ]  # fmt: skip


def config_dir():
    import os

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _train(argv) -> list[dict]:
    """train.main with the scripted engine; returns this rank's metrics of every step (only
    rank 0 writes them to the metrics file)."""
    tok = tokenizer_of(config.parse(argv).data)
    rows, real_step = [], train.train_step

    def recording_step(run, t):
        rows.append(real_step(run, t))
        return rows[-1]

    train.train_step = recording_step
    try:
        train.main(argv, engine=ScriptedEngine(tok))
    finally:
        train.train_step = real_step
    return rows


def _read(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def save_initial(argv, path):
    run = launch.setup(config.parse(argv), engine=None)
    checkpoint.save(path, run.trainable, checkpoint.Progress(), run.cfg)


def engine_of_setup(argv) -> str:
    return type(launch.setup(config.parse(argv)).engine).__name__


def test_ntp_only_run_builds_no_rollout_engine(tiny_corpus, tmp_path):
    """NTP only samples nothing: its --rollout-url (nothing listens there) is never contacted,
    and no weights are synced each step (the embedded engine's sync copies nothing)."""
    url = ["--rollout-url", "http://127.0.0.1:9", "--weight-sync-dir", str(tmp_path)]
    argv = _flags(tiny_corpus, extra=[*url, "--rmt-variant", "ntp"])
    assert spawn(engine_of_setup, 1, args=(argv,))[0] == "EmbeddedEngine"


@pytest.fixture(scope="module")
def initial(tiny_corpus, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("init"))
    spawn(save_initial, 1, args=(_flags(tiny_corpus), path))
    return path


LAYOUT_KEYS = ("ntp_loss", "rl_loss", "grad_norm", "reward", "entropy_all")


def _layout_metrics(corpus, initial, tmp, tp, pp):
    """The metrics file's rows, after checking that every rank computed those same metrics."""
    metrics = str(tmp / f"tp{tp}pp{pp}.jsonl")
    argv = _flags(corpus, tp, pp, extra=["--load", initial, "--metrics-file", metrics])
    ranks = spawn(_train, tp * pp, tp=tp, pp=pp, args=(argv,))
    logged = _read(metrics)
    for rank, rows in enumerate(ranks):
        assert len(rows) == len(logged), rank
        for got, row in zip(rows, logged, strict=True):
            for key in LAYOUT_KEYS:
                assert got[key] == pytest.approx(row[key], rel=1e-6, abs=1e-9), (rank, key)
    return logged


@pytest.fixture(scope="module")
def reference(tiny_corpus, initial, tmp_path_factory):
    got = _layout_metrics(tiny_corpus, initial, tmp_path_factory.mktemp("ref"), 1, 1)
    assert [m["step"] for m in got] == [0, 1]
    for m in got:  # both terms really train
        assert m["rl_tokens_trained"] > 0 and m["ntp_tokens"] > 0 and m["rl_loss"] != 0
    return got


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_rmt_steps_agree_across_layouts(tiny_corpus, initial, reference, tmp_path, tp, pp):
    got = _layout_metrics(tiny_corpus, initial, tmp_path, tp, pp)
    for a, b in zip(got, reference, strict=True):
        for key in LAYOUT_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def variants_one_step(argv_base):
    """Step 0 of each variant from the same weights: its metrics plus the levels of the
    positions it chose."""
    out = {}
    real_pass = step.ntp_pass
    for variant in ("rmt", "no_dtb", "no_cas", "no_ntp", "rpt", "ntp"):
        cfg = config.parse([*argv_base, "--rmt-variant", variant])
        run = launch.setup(cfg)
        run.engine = ScriptedEngine(run.tokenizer)
        levels = []
        step.ntp_pass = _recording_levels(real_pass, levels)
        try:
            out[variant] = {**train.train_step(run, 0), "levels": levels}
        finally:
            step.ntp_pass = real_pass
    return out


def _recording_levels(ntp_pass, levels: list):
    """ntp_pass that also appends the level of every chosen position to `levels`."""

    def recording_pass(*args, **kwargs):
        outcome = ntp_pass(*args, **kwargs)
        levels.extend(p.level for p in outcome.problems)
        return outcome

    return recording_pass


def test_variant_switches(tiny_corpus, initial):
    # Every variant starts from the same weights. Levels from per-microbatch entropy quantiles
    # (every level has candidates in every window) and a curriculum that wants hard positions
    # only: CAS and uniform choices differ.
    quantile_hard = ["--bucket-mode", "quantile", "--curriculum-start", "0", "0", "1"]
    flags = _flags(tiny_corpus, extra=["--load", initial, *quantile_hard])
    m = spawn(variants_one_step, 1, args=(flags,))[0]
    windows = 4 * 128
    for v in ("rmt", "no_dtb", "no_cas", "no_ntp"):
        assert m[v]["rl_positions"] == 4, v  # one position per window (tiny_cpu.yaml)
    # CAS draws the level first: only hard positions; without CAS (uniform over all candidates,
    # 4 of 5 of which are not hard at these quantiles) the draw lands elsewhere.
    for v in ("rmt", "no_dtb", "no_ntp"):
        assert m[v]["levels"] == [2, 2, 2, 2], v
    assert m["no_cas"]["levels"] != [2, 2, 2, 2] and set(m["no_cas"]["levels"]) <= {0, 1, 2}
    assert m["no_cas"]["entropy_chosen"] < m["rmt"]["entropy_chosen"]
    # Without NTP the same positions, rollouts and RL loss; only the lambda * NTP gradient is gone.
    for key in ("ntp_loss", "rl_loss", "reward", "ntp_tokens"):
        assert m["no_ntp"][key] == pytest.approx(m["rmt"][key], rel=1e-6), key
    assert abs(m["no_ntp"]["grad_norm"] - m["rmt"]["grad_norm"]) > 1e-3 * m["rmt"]["grad_norm"]
    # RPT: every candidate its entropy filter keeps (a random model is uncertain everywhere).
    assert m["rpt"]["rl_positions"] > 4 * 50
    assert m["ntp"]["rl_positions"] == 0 and m["ntp"]["rl_tokens"] == 0
    # NTP masks exactly the chosen positions; the plain-NTP run trains on all of them.
    assert m["rmt"]["ntp_tokens"] == m["ntp"]["ntp_tokens"] - 4
    assert m["ntp"]["ntp_tokens"] <= windows
    # The budget: its length reward separates the scripted samples; without DTB nothing does.
    assert m["rmt"]["budget"] == 4 and m["rmt"]["reward_length"] > 0
    assert m["rmt"]["zero_adv_share"] == 0
    assert m["no_dtb"]["budget"] == 0 and m["no_dtb"]["reward_length"] == 0
    assert m["no_dtb"]["zero_adv_share"] == 1 and m["no_dtb"]["rl_tokens_trained"] == 0
    assert m["rpt"]["budget"] == 0 and m["rpt"]["reward_length"] == 0
    # "\\boxed{x}" prefix-matches only where the text goes on with "x": most groups tie.
    assert 0.9 < m["rpt"]["zero_adv_share"] < 1
    # Without NTP (and RPT) the NTP pass is forward-only: the loss is measured, not trained.
    assert m["no_ntp"]["rl_tokens_trained"] > 0
    assert m["ntp"]["grad_norm"] > 0 and m["rmt"]["grad_norm"] > 0


def test_resume_continues_exactly(tiny_corpus, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    full, resumed = str(tmp_path / "full.jsonl"), str(tmp_path / "resumed.jsonl")
    spawn(_train, 1, args=(_flags(tiny_corpus, iters=4, extra=[
        "--save", ckpt, "--save-interval", "2", "--metrics-file", full]),))  # fmt: skip
    assert checkpoint.latest_step(ckpt) == 4
    # Resume from the step-2 checkpoint, as if the run had died after saving it.
    with open(f"{ckpt}/{checkpoint.TRACKER}", "w") as fh:
        fh.write("2")
    spawn(_train, 1, args=(_flags(tiny_corpus, iters=4, extra=[
        "--load", ckpt, "--metrics-file", resumed]),))  # fmt: skip
    a, b = _read(full)[2:], _read(resumed)
    assert [m["step"] for m in b] == [2, 3]
    for x, y in zip(a, b, strict=True):
        for key in ("ntp_loss", "rl_loss", "grad_norm", "entropy_all", "reward"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), key


def crash_during_second_save(argv, root):
    run = launch.setup(config.parse(argv))
    run.engine = ScriptedEngine(run.tokenizer)
    train.train_step(run, 0)
    checkpoint.save(root, run.trainable, checkpoint.Progress(step=1), run.cfg)
    real_save = checkpoint.dist_checkpointing.save

    def dying_save(state, path):
        open(f"{path}/half_written.distcp", "w").write("garbage")
        raise KeyboardInterrupt("killed mid-save")

    checkpoint.dist_checkpointing.save = dying_save
    try:
        checkpoint.save(root, run.trainable, checkpoint.Progress(step=2), run.cfg)
    except KeyboardInterrupt:
        pass
    finally:
        checkpoint.dist_checkpointing.save = real_save
    latest = checkpoint.latest_step(root)
    progress = checkpoint.load(root, run.trainable)  # the previous checkpoint still loads
    return latest, progress.step


def test_crash_during_save_keeps_previous_checkpoint(tiny_corpus, tmp_path):
    root = str(tmp_path / "ckpt")
    latest, loaded = spawn(crash_during_second_save, 1, args=(_flags(tiny_corpus), root))[0]
    assert latest == 1 and loaded == 1


def embedded_logprob_gap(argv):
    run = launch.setup(config.parse(argv))
    prompt = run.tokenizer.encode("Question: What is 2 + 3? Answer: The sum is")
    req = RolloutRequest(prompt, n=3, max_tokens=6, temperature=1.0, top_p=1.0, seed=5)
    results = run.engine.generate([req])
    groups = rl_groups.rows([req], results, torch.ones(1, 3), pad_id=run.tokenizer.eod)
    out = step.rl_pass(run.trainable, groups, 1.0, rl_groups.settings(chunk_tokens=1024))
    same_on_all_ranks = parallel.broadcast_object_in_replica(results[0].responses, run.talker)
    return out.logprob_gap_sum / out.tokens, out.tokens, same_on_all_ranks == results[0].responses


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_embedded_engine_logprobs_match_the_trainer(tiny_corpus, tmp_path, tp, pp):
    argv = _flags(tiny_corpus, tp, pp)
    for gap, tokens, consistent in spawn(embedded_logprob_gap, tp * pp, tp=tp, pp=pp, args=(argv,)):
        assert 3 <= tokens <= 18  # 3 samples of 1 to 6 tokens
        assert gap < 1e-4  # KV-cache decoding gives the full forward's distribution
        assert consistent


def stable_then_decay(argv):
    run = launch.setup(config.parse(argv))
    run.engine = ScriptedEngine(run.tokenizer)
    lrs = [train.train_step(run, t)["lr"] for t in range(4)]
    return lrs, run.data.consumed_samples, run.decay_data.consumed_samples


def test_stable_then_decay_switches_the_blend(tiny_corpus):
    argv = _flags(tiny_corpus, iters=4, extra=[
        "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "2", "--decay-data-path", tiny_corpus])  # fmt: skip
    lrs, stable, decay = spawn(stable_then_decay, 1, args=(argv,))[0]
    assert stable == 2 * 4 and decay == 2 * 4  # two steps of 4 sequences from each stream
    assert lrs[:3] == [1e-3] * 3 and lrs[3] < 1e-3  # constant, then the decay begins


def kl_run_then_resume(argv, ckpt):
    """Two KL steps from the run's own start; then a resume at step 2 without --ref-load."""
    run = launch.setup(config.parse(argv))
    run.engine = ScriptedEngine(run.tokenizer)
    loop.run_steps(run, train.train_step)
    try:
        launch.setup(config.parse([*argv, "--load", ckpt, "--train-iters", "3"]))
    except config.ConfigError as e:
        return str(e)
    return None


def test_kl_to_the_reference_policy(tiny_corpus, initial, reference, tmp_path):
    """beta > 0: pi_ref is the starting weights, so the KL (and its gradient) is exactly zero at
    step 0, the gradient equals the beta = 0 run's there, and the KL is positive once the policy
    has moved; PP=2 gives the same numbers."""
    runs = {}
    for tp, pp in ((1, 1), (1, 2)):
        metrics, ckpt = str(tmp_path / f"kl{tp}{pp}.jsonl"), str(tmp_path / f"ckpt{tp}{pp}")
        argv = _flags(tiny_corpus, tp, pp, extra=[
            "--load", initial, "--metrics-file", metrics, "--kl-beta", "0.5", "--save", ckpt])  # fmt: skip
        errors = spawn(kl_run_then_resume, tp * pp, tp=tp, pp=pp, args=(argv, ckpt))
        assert all("--ref-load" in e for e in errors)
        runs[tp, pp] = _read(metrics)
    s0, s1 = runs[1, 1]
    assert s0["kl"] == 0.0 and s1["kl"] > 0
    assert s0["grad_norm"] == pytest.approx(reference[0]["grad_norm"], rel=1e-6)
    assert s1["grad_norm"] != pytest.approx(reference[1]["grad_norm"], rel=1e-6)
    for a, b in zip(runs[1, 2], runs[1, 1], strict=True):
        for key in ("ntp_loss", "rl_loss", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key


def reference_vs_naive(argv, ref_dir):
    """Log-probs of pi_ref against a naive forward of --ref-load's weights (perturbed here so
    they differ from the run's own) and against the policy's."""
    start = launch.setup(config.parse(argv))
    moved = start.trainable.model[0].module
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpoint.save_model(ref_dir, moved, start.cfg)
    run = launch.setup(config.parse([*argv, "--kl-beta", "0.1", "--ref-load", ref_dir]))
    req = RolloutRequest(run.tokenizer.encode("One two three"), n=2, max_tokens=5,
                         temperature=0.7, top_p=1.0, seed=3)  # fmt: skip
    results = ScriptedEngine(run.tokenizer).generate([req])
    groups = rl_groups.rows([req], results, torch.ones(1, 2), pad_id=run.tokenizer.eod)
    got = step.reference_logprobs(run.reference, groups, 0.7, 1024)[0]  # [2, L]
    g = groups[0]
    positions = torch.arange(g.tokens.shape[1]).expand_as(g.tokens)

    def naive(model):  # [2, L]
        with torch.no_grad():
            logp = torch.log_softmax(model(g.tokens, positions, None) / 0.7, -1)
        return logp.gather(-1, g.labels.unsqueeze(-1)).squeeze(-1)

    policy = run.trainable.model[0].module
    return (got - naive(moved)).abs().max().item(), (got - naive(policy)).abs().max().item()


def test_reference_logprobs_come_from_ref_load(tiny_corpus, tmp_path):
    to_ref, to_policy = spawn(reference_vs_naive, 1, args=(_flags(tiny_corpus), str(tmp_path)))[0]
    assert to_ref < 1e-5 and to_policy > 1e-3


def overlap_probe(argv):
    """Which rank calls the service, and whether the NTP pass was still running at each call.
    The probed pass waits (up to 30 s) for a first call before it returns: a trainer that only
    dispatches after the pass records every call as after it."""
    run = launch.setup(config.parse(argv))
    in_pass, called, calls = threading.Event(), threading.Event(), []
    engine = ScriptedEngine(run.tokenizer)
    scripted = engine.generate

    def generate(requests):
        calls.append((in_pass.is_set(), len(requests)))
        called.set()
        return scripted(requests)

    engine.generate = generate
    run.engine = engine
    real_pass = step.ntp_pass

    def probed_pass(*args, **kwargs):
        in_pass.set()
        try:
            return real_pass(*args, **kwargs)
        finally:
            called.wait(timeout=30 if parallel.layout_of_this_rank().is_last_stage else 0)
            in_pass.clear()

    step.ntp_pass = probed_pass
    try:
        metrics = train.train_step(run, 0)
    finally:
        step.ntp_pass = real_pass
    return calls, metrics["rl_positions"], metrics["rl_tokens"]


def test_rollouts_start_while_the_ntp_pass_runs(tiny_corpus):
    first, last = spawn(overlap_probe, 2, pp=2, args=(_flags(tiny_corpus, pp=2),))
    assert first[0] == []  # the first stage never talks to the service
    calls, positions, rl_tokens = last
    assert len(calls) == positions == 4  # one request per chosen position, from the last stage
    assert any(during for during, _ in calls)
    assert first[1:] == last[1:] and rl_tokens > 0  # both stages train on the results
