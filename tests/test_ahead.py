"""One-step-ahead rollouts (`--rollout-ahead 1`, ahead.py) on gloo: which step's positions each
RL term trains on, under which budget, with which versions; a resume with rollouts in flight.

The engine is scripted like test_train's (even samples close the think block after one token,
odd ones never do), answers through the service path (not collective: the talker sends each
microbatch's requests during the NTP pass and the results are collected a step later), returns
log-probs near the trainer's so that truncated importance sampling really weights and caps, and
can answer chosen requests from an old weight version.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from distributed import spawn
from test_train import ScriptedEngine, _flags, _read

from megatron_rmt import ahead, config, grpo, launch, loop, parallel, problems, rl_batch, step
from megatron_rmt import train as train_mod
from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult
from megatron_rmt.tokenizer import tokenizer_of


class AheadEngine(ScriptedEngine):
    """test_train's scripted service, with log-probs near the trainer's and chosen requests
    answered from an old version."""

    def __init__(self, tokenizer, stale=None):
        super().__init__(tokenizer)
        # {request seed: step}: that step's request answered from the version before the step's,
        # so 2 versions behind when step + 1 trains it (just one more than allowed)
        self.stale = stale or {}

    def generate(self, requests):
        out = []
        for r, scripted in zip(requests, super().generate(requests), strict=True):
            # About the trainer's log-prob of a random 50k-vocabulary model (~ -10.8 nats):
            # ratios on both sides of the TIS cap.
            logprobs = [
                [-10.0 - ((r.seed + 3 * i + k) % 7) / 4 for k in range(len(x))]
                for i, x in enumerate(scripted.responses)
            ]
            version = self.stale[r.seed] - 1 if r.seed in self.stale else self.version
            out.append(RolloutResult(scripted.responses, logprobs, version))
        return out


ARGS = ["--rollout-ahead", "1", "--tis-cap", "1.5"]
ITERS = 2  # B_t = 4, 1: a step's budget differs from the next one's


def _budget(cfg, s):
    r = cfg.rmt
    return max(r.budget_min, math.floor(r.budget_initial * r.budget_gamma ** (s / ITERS)))


def _expected_rl(run, s, chosen, engine_cls, stale):
    """Step s's chosen positions trained from the current weights, built here from scratch:
    step s's budget and sampling seed, the groups of stale results left out."""
    cfg, tok = run.cfg, run.tokenizer
    budget = _budget(cfg, s)
    seed = launch.rollout_seed(run, s)
    requests = problems.make_requests(chosen, tok, run.template, budget, cfg.rmt, seed, 0)
    engine = engine_cls(tok, stale)
    engine.version = s
    results = engine.generate(requests)
    kept = [
        problems.Group(p, q, res)
        for p, q, res in zip(chosen, requests, results, strict=True)
        if q.seed not in stale
    ]
    scored = problems.score(kept, tok, run.template, budget, cfg.rmt, prefix_match=False)
    adv, _ = grpo.group_advantages(scored.rewards, delta=cfg.rmt.advantage_delta)
    out = step.rl_update(
        run.trainable, problems.with_advantages(kept, adv), step.RLSettings.of(cfg.rmt),
        rl_batch.builder(cfg, tok.eod),
    )  # fmt: skip
    return {
        "rl_loss": out.loss_sum / out.total_count,
        "rl_tokens": out.total_tokens,
        "tis_ratio": out.tis_ratio_sum / out.tokens,
        "reward_length": float(scored.length.mean()),
        "stale": len(chosen) - len(kept),
        "problems": [g.problem for g in kept],
    }


def ahead_steps(argv):
    """ITERS steps one ahead; per step its metrics, what it chose, what its RL term trained on,
    and the RL term expected from the step before's positions at this step's starting weights
    (computed first: the step zeroes the gradient buffers before its own passes)."""
    run = launch.setup(config.parse(argv))
    stale = {parallel.mix_seed(launch.rollout_seed(run, 0), 0): 0}  # step 0's first request
    run.engine = AheadEngine(run.tokenizer, stale)
    chosen, trained = [], []
    real_pass, real_finish = step.ntp_pass, loop.finish_step

    def recording_pass(trainable, microbatches, *args, **kwargs):
        out = real_pass(trainable, microbatches, *args, **kwargs)
        chosen.append((out.problems, sum(int(mb["loss_mask"].sum()) for mb in microbatches)))
        return out

    def recording_finish(run, t, groups):
        trained.append([g.problem for g in groups])
        return real_finish(run, t, groups)

    step.ntp_pass, loop.finish_step = recording_pass, recording_finish
    rows = []
    try:
        for t in range(ITERS):
            expected = _expected_rl(run, t - 1, chosen[-1][0], AheadEngine, stale) if t else None
            rows.append((train_mod.train_step(run, t), expected))
    finally:
        step.ntp_pass, loop.finish_step = real_pass, real_finish
    return rows, chosen, trained


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_one_step_ahead_bookkeeping(tiny_corpus, tp, pp):
    argv = _flags(tiny_corpus, tp, pp, iters=ITERS, extra=ARGS)
    ranks = spawn(ahead_steps, tp * pp, tp=tp, pp=pp, args=(argv,))
    rows, chosen, trained = ranks[0]
    for other in ranks[1:]:  # every rank trained the same positions to the same metrics
        assert other[1] == chosen and other[2] == trained
        for (a, _), (b, _) in zip(other[0], rows, strict=True):
            for key in ("rl_loss", "ntp_loss", "grad_norm", "rl_from_step", "rollout_stale"):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-12), key
    # The first step has no RL term; its positions are still masked out of its own NTP loss.
    first, _ = rows[0]
    assert first["rl_from_step"] == -1 and first["rl_tokens"] == 0 and trained[0] == []
    for t, ((m, expected), (picked, mask_tokens)) in enumerate(zip(rows, chosen, strict=True)):
        assert len(picked) == 4  # one per window, chosen in step t
        assert m["rl_positions"] == len(trained[t])  # the served groups its RL term trained on
        assert m["ntp_tokens"] == mask_tokens - len(picked)
        assert m["budget"] == _budget(config.parse(argv, world_size=tp * pp), t)
        if expected is None:
            continue
        # Step t trains on step t-1's positions (less the refused stale result), under
        # B_{t-1}, from the weights step t starts at: the RL term built here from scratch.
        assert m["rl_from_step"] == t - 1
        assert trained[t] == expected["problems"]
        assert [p for p in chosen[t - 1][0] if p in trained[t]] == trained[t]
        assert m["rollout_stale"] == expected["stale"] == 1
        assert m["rl_tokens"] == expected["rl_tokens"] > 0
        assert m["reward_length"] == pytest.approx(expected["reward_length"], rel=1e-9)
        assert m["rl_loss"] == pytest.approx(expected["rl_loss"], rel=1e-6, abs=1e-12)
        assert m["tis_ratio"] == pytest.approx(expected["tis_ratio"], rel=1e-6)
        assert 0 < m["tis_capped_share"] < 1  # the engine's log-probs sit around the cap
    # Scored under B_0 = 4: one thinking token of 4 in half of the samples (under B_1 = 1 the
    # length reward would be 4 times larger).
    assert rows[1][0]["reward_length"] == pytest.approx(0.5 * 1 / 4)


def _train(argv):
    tok = tokenizer_of(config.parse(argv).data)
    train_mod.main(argv, engine=AheadEngine(tok))


def test_resume_with_rollouts_in_flight_is_exact(tiny_corpus, tmp_path):
    """A checkpoint after step 1 of 3 holds step 1's positions, sampled and not yet trained;
    the run resumed from it trains them in step 2 exactly as the uninterrupted run did."""
    ckpt = str(tmp_path / "ckpt")
    full, resumed = str(tmp_path / "full.jsonl"), str(tmp_path / "resumed.jsonl")
    run_flags = ["--save", ckpt, "--save-interval", "2", "--metrics-file", full, *ARGS]
    spawn(_train, 1, args=(_flags(tiny_corpus, iters=3, extra=run_flags),))
    common = torch.load(f"{ckpt}/iter_0000003/common.pt", weights_only=True)
    (last,) = common["progress"]["pending_rollouts"]["replicas"]  # the last step's, kept
    assert last["step"] == 2 and len(last["results"]) == len(last["problems"]) == 4
    with open(f"{ckpt}/latest_checkpointed_iteration.txt", "w") as fh:
        fh.write("2")  # as if the run had died after the step-2 save
    resume_flags = ["--load", ckpt, "--metrics-file", resumed, *ARGS]
    spawn(_train, 1, args=(_flags(tiny_corpus, iters=3, extra=resume_flags),))
    a, b = _read(full)[2:], _read(resumed)
    assert [m["rl_from_step"] for m in b] == [1] and b[0]["rl_tokens"] > 0
    for x, y in zip(a, b, strict=True):
        for key in ("ntp_loss", "rl_loss", "grad_norm", "tis_ratio", "reward", "rl_tokens"):
            assert x[key] == y[key], key


def _group(version):
    request = RolloutRequest([1, 2], n=2, max_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    return problems.Group(None, request, RolloutResult([[3], [4]], [[-1.0], [-1.0]], version))


def test_versions_more_than_allowed_behind_are_refused():
    groups = [_group(v) for v in (5, 4, 3, 5)]
    kept, stale = ahead.fresh(groups, 5, max_lag=1)  # one step ahead, synced every step
    assert [g.result.weight_version for g in kept] == [5, 4, 5] and stale == 1
    kept, stale = ahead.fresh(groups, 5, max_lag=0)  # on-policy
    assert [g.result.weight_version for g in kept] == [5, 5] and stale == 2
    with pytest.raises(RuntimeError, match="only at v4"):
        ahead.fresh(groups, 4, max_lag=1)


class FakeRollouts:
    """dispatch.StepRollouts' surface: `results` answers every request, from version `version`;
    `log` records which step's results were collected when."""

    def __init__(self, step, collective, log, version):
        self.engine = SimpleNamespace(collective=collective)
        self.step, self.log, self.version = step, log, version
        self.invalid, self.dropped = 0, 0

    def results(self, requests):
        self.log.append(self.step)
        return [RolloutResult([[3], [4]], [[-1.0], [-1.0]], self.version) for _ in requests]


def _chosen(t, collective, log, version=None):
    request = RolloutRequest([1, 2], n=2, max_tokens=4, temperature=1.0, top_p=1.0, seed=t)
    rollouts = FakeRollouts(t, collective, log, t if version is None else version)
    return ahead.Chosen(t, [f"problem {t}"], [request], 10 - t, rollouts)


@pytest.mark.parametrize("collective", [True, False], ids=["embedded", "service"])
def test_queue_order_one_step_ahead(collective):
    log = []
    queue = ahead.RolloutQueue(ahead=1, sync_interval=1)
    first = queue.exchange(0, _chosen(0, collective, log))
    assert (first.step, first.groups) == (-1, [])
    # The embedded engine samples each step's positions in that step (at its weights); a
    # service's are collected a step later, when they train.
    assert log == ([0] if collective else [])
    source = queue.exchange(1, _chosen(1, collective, log))
    assert (
        source.step == 0
        and source.budget == 10
        and [g.problem for g in source.groups] == ["problem 0"]
    )
    assert log == ([0, 1] if collective else [0])
    source = queue.exchange(2, _chosen(2, collective, log, version=0))  # trained at v3: stale
    assert source.step == 1 and source.stale == 0
    assert queue.drain() == 1 and log[-1] == 2  # the last step's: waited for, not trained
    source = queue.exchange(3, _chosen(3, collective, log))
    assert source.step == 2 and source.stale == 1 and source.groups == []
    on_policy = ahead.RolloutQueue(ahead=0, sync_interval=1)
    source = on_policy.exchange(5, _chosen(5, collective, log))
    assert source.step == 5 and len(source.groups) == 1 and on_policy.pending is None
