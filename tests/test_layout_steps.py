"""One training step (`train.train_step`) of the tiny model from one initial checkpoint is the same
step whatever the layout: two data-parallel replicas equal one process over the same global batch
(NTP only, and with an RL part from scripted rollouts), and the default embedded rollout engine,
sampling inside the step at TP 2 or PP 2, agrees with TP 1. Every rank's result is checked."""

import pytest
import torch
from distributed import spawn
from test_train import ScriptedEngine, _flags, save_initial

from megatron_rmt import config, launch, train

COMPARED = ("ntp_loss", "rl_loss", "grad_norm", "reward", "entropy_all", "logprob_gap")
COUNTED = ("ntp_tokens", "rl_positions", "rl_tokens", "rl_tokens_trained")


def one_step(argv, scripted):
    """Step 0: (metrics, rollouts as (prompt, responses, log-probs), update fingerprint)."""
    run = launch.setup(config.parse(argv))
    if scripted:
        run.engine = ScriptedEngine(run.tokenizer)
    rollouts = []
    sample = run.engine.generate

    def recording_generate(requests):
        results = sample(requests)
        for req, res in zip(requests, results, strict=True):
            rollouts.append((req.prompt_ids, res.responses, res.logprobs))
        return results

    run.engine.generate = recording_generate
    params = [p for _, p in sorted(run.trainable.model[0].named_parameters())]
    before = [p.detach().clone() for p in params]
    metrics = train.train_step(run, 0)
    return metrics, rollouts, _fingerprint(params, before)


def _fingerprint(params, before) -> list[tuple[float, float]]:
    """Per parameter: the update's norm and its projection on a fixed random direction."""
    out = []
    for i, (p, p0) in enumerate(zip(params, before, strict=True)):
        delta = (p.detach() - p0).double()
        direction = torch.randn(delta.shape, generator=torch.Generator().manual_seed(i))
        out.append((float(delta.norm()), float((delta * direction).sum())))
    return out


@pytest.fixture(scope="module")
def initial(tiny_corpus, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("init"))
    spawn(save_initial, 1, args=(_flags(tiny_corpus), path))
    return path


def _assert_same_metrics(got, ref, rank):
    for key in COMPARED:
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (rank, key)
    for key in COUNTED:
        assert got[key] == ref[key], (rank, key)


def ntp_and_rmt_steps(argv):
    """Step 0 of plain NTP and of RMT (scripted rollouts), each from the initial weights."""
    return {v: one_step([*argv, "--rmt-variant", v], True) for v in ("ntp", "rmt")}


@pytest.fixture(scope="module")
def data_parallel(tiny_corpus, initial):
    """({variant: DP 1 result}, [{variant: result} of each DP 2 rank])."""
    argv = _flags(tiny_corpus, extra=["--load", initial])
    return spawn(ntp_and_rmt_steps, 1, args=(argv,))[0], spawn(ntp_and_rmt_steps, 2, args=(argv,))


@pytest.mark.parametrize("variant", ["ntp", "rmt"])
def test_two_replicas_step_like_one_process(data_parallel, variant):
    """Global batch 4 in microbatches of 2: DP 1 runs both, each DP 2 replica one. Gradients
    are summed over replicas and normalised by the global token and RL counts, so losses, grad
    norm and the updated weights match within fp32 reduction order."""
    ref, ref_rollouts, ref_update = data_parallel[0][variant]
    ranks = [by_variant[variant] for by_variant in data_parallel[1]]
    if variant == "rmt":  # the RL part really trains
        assert ref["rl_tokens_trained"] > 0 and ref["rl_loss"] != 0
    else:
        assert ref["rl_positions"] == 0 and not ref_rollouts
    # The two replicas chose the positions one process chose, half each.
    assert sorted(r for _, rollouts, _ in ranks for r in rollouts) == sorted(ref_rollouts)
    assert all(len(rollouts) == len(ref_rollouts) / 2 for _, rollouts, _ in ranks)
    for rank, (metrics, _, update) in enumerate(ranks):
        _assert_same_metrics(metrics, ref, rank)
        assert len(update) == len(ref_update)
        for (norm, proj), (ref_norm, ref_proj) in zip(update, ref_update, strict=True):
            assert norm == pytest.approx(ref_norm, rel=1e-4, abs=1e-9), rank
            assert proj == pytest.approx(ref_proj, rel=1e-3, abs=1e-6), rank


@pytest.fixture(scope="module")
def embedded_tp1(tiny_corpus, initial):
    return spawn(one_step, 1, args=(_embedded_flags(tiny_corpus, initial, 1, 1), False))[0]


def _embedded_flags(corpus, initial, tp, pp):
    # A random model earns no reward, so every group's advantages are 0; with a KL term (pi_ref:
    # the initial weights, KL 0 at step 0) such groups still go through the RL pass, which then
    # recomputes every sampled token's log-prob: the engine's and the trainer's are compared.
    return _flags(corpus, tp, pp, extra=["--load", initial, "--kl-beta", "0.5"])


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_embedded_engine_step_agrees_across_layouts(tiny_corpus, initial, embedded_tp1, tp, pp):
    """The default engine samples inside the step on every rank of the replica. Same seed, same
    samples: PP 2 computes exactly what TP 1 does; TP 2 sums partial products in another order
    (logits differ in the last bits), yet the sampled tokens agree on this model and seed, so the
    tokens are compared exactly and the log-probs, losses and grad norm within fp32 tolerance."""
    ref, ref_rollouts, _ = embedded_tp1
    assert ref["rl_positions"] == 4 and ref["rl_tokens_trained"] == ref["rl_tokens"] > 0
    assert 0 < ref["logprob_gap"] < 1e-4  # the engine's log-probs are the trainer's own
    argv = _embedded_flags(tiny_corpus, initial, tp, pp)
    for rank, (metrics, rollouts, _) in enumerate(
        spawn(one_step, tp * pp, tp=tp, pp=pp, args=(argv, False))
    ):
        assert [r[:2] for r in rollouts] == [r[:2] for r in ref_rollouts], rank
        for (_, _, logprobs), (_, _, ref_logprobs) in zip(rollouts, ref_rollouts, strict=True):
            torch.testing.assert_close(
                torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-4, rtol=0
            )
        _assert_same_metrics(metrics, ref, rank)
