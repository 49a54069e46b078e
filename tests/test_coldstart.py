"""coldstart.py: the think text and its length, the boxed answer (the model's own guess, never
the true token), the SFT loss mask (response only), the replica split, and one cold start of
the tiny model end to end whose answers equal a naive forward's argmax."""

import json

import pytest
import torch
from conftest import GPT2, ROOT
from distributed import spawn

from megatron_rmt import checkpoint, coldstart, config, launch, prompts
from megatron_rmt.evaluation import forward
from megatron_rmt.tokenizer import tokenizer_of


@pytest.fixture(scope="module")
def tok():
    cfg = config.parse(["--config", f"{ROOT}/configs/tiny_cpu.yaml", *GPT2], world_size=1)
    return tokenizer_of(cfg.data)


def test_think_is_exactly_the_length_asked_most_probable_first(tok):
    cands = [" the", " a", "\n", " of", " x"] * 4
    for length in (1, 5, 17):
        ids = coldstart.think_ids(tok, cands, length)
        assert len(ids) == length
        assert (
            tok.decode(ids)
            == tok.decode(coldstart.think_ids(tok, cands, 200))[: len(tok.decode(ids))]
        )
    full = tok.decode(coldstart.think_ids(tok, cands[:2], 200))
    assert full == 'Most probable: "the". Other candidates: "a",'  # all listed: shorter than asked
    assert '"\\n"' in tok.decode(coldstart.think_ids(tok, [" y", "\n"], 50))  # escaped whitespace


def test_response_closes_the_think_boxes_the_top_guess_and_ends_with_eod(tok):
    ids = coldstart.response_ids(tok, [" Paris", " London"], 6)
    assert ids[-1] == tok.eod
    text = tok.decode(ids[:-1])
    assert prompts.extract_prediction(text) == "Paris"
    assert len(coldstart.think_ids(tok, [" Paris", " London"], 6)) == 6
    assert text.startswith(tok.decode(coldstart.think_ids(tok, [" Paris", " London"], 6)))
    assert coldstart.response_ids(tok, [" {", " a"], 4) is None  # cannot be boxed


def test_examples_box_the_model_guess_skip_special_tokens_and_draw_budgets(tok):
    template = prompts.load_template("ntr_base")
    prefixes = [tok.encode("The capital of France is")] * 40
    paris, london = tok.encode(" Paris")[0], tok.encode(" London")[0]
    tops = [[tok.eod, london, paris]] * 40  # the model's guesses; the truth (" Paris") is unused
    examples = coldstart.build_examples(prefixes, tops, tok, template, (3, 9), 0.25, seed=1)
    assert len(examples) == 40
    free = [e for e in examples if e.budget is None]
    assert 0 < len(free) < 40
    for ex in examples:
        response = tok.decode(ex.response_ids[:-1])
        assert prompts.extract_prediction(response) == "London"  # EOD skipped; top-1 is London
        assert "Paris" not in response.split("</think>")[1]
        assert 3 <= ex.think_tokens <= 9
        if ex.budget is not None:
            assert ex.think_tokens == ex.budget
            assert f"exactly {ex.budget} tokens" in tok.decode(ex.prompt_ids)
    again = coldstart.build_examples(prefixes, tops, tok, template, (3, 9), 0.25, seed=1)
    assert again == examples


def test_sft_loss_mask_is_one_exactly_on_response_labels():
    examples = [
        coldstart.Example([1], [5, 6, 7], [8, 9], 2, 1),
        coldstart.Example([1], [5, 6], [8, 9, 10, 11], 2, 3),
    ]
    batch = coldstart.sft_microbatch(examples, length=8, pad_id=0)
    assert batch["tokens"].shape == batch["loss_mask"].shape == (2, 8)
    for i, ex in enumerate(examples):
        row = ex.prompt_ids + ex.response_ids
        want = [0.0] * 8
        for j in range(8):  # label j is token j + 1: trained iff that token is a response token
            want[j] = float(len(ex.prompt_ids) <= j + 1 < len(row))
        assert batch["loss_mask"][i].tolist() == want
        assert batch["labels"][i, : len(row) - 1].tolist() == row[1:]
    assert batch["position_ids"][1].tolist() == list(range(8))


def test_step_batches_split_each_global_batch_over_replicas():
    examples = [coldstart.Example([1], [2] * (i % 3 + 1), [3, 4], None, 1) for i in range(10)]
    mine = [coldstart.step_batches(examples, 4, 1, r, 2, pad_id=0) for r in range(2)]
    assert len(mine[0]) == len(mine[1]) == 2  # 10 examples: two full batches of 4
    for step in range(2):
        rows = [mb["tokens"][0] for r in range(2) for mb in mine[r][step]]
        assert len(rows) == 4 and len({row.shape for row in rows}) == 1  # one shape per step


def _flags(tmp: str, corpus: str, save: str) -> list[str]:
    return [
        "--config", f"{ROOT}/configs/tiny_cpu.yaml", *GPT2, "--seq-length", "48",
        "--min-context", "4", "--bucket-mode", "quantile",
        "--coldstart-per-level", "4", "--coldstart-candidates", "6", "--coldstart-max-documents", "8",
        "--coldstart-epochs", "3", "--coldstart-ntp-windows", "2",
        "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "3e-3",
        "--data-path", corpus, "--save", f"{tmp}/{save}", "--load", f"{tmp}/base",
    ]  # fmt: skip


def cold_start_tiny(tmp: str, corpus: str):
    """A random tiny model saved as the base, one cold start from it (three epochs, NTP windows
    mixed in); per example its boxed answer, the base model's naive argmax there
    (full-vocabulary forward, specials excluded) and the position's true next token; the SFT
    loss of every step."""
    flags = _flags(tmp, corpus, "cs")
    cfg = config.parse(flags, world_size=1)
    tokenizer = tokenizer_of(cfg.data)
    vocab = launch.model_vocab(cfg, tokenizer)
    model = forward.build_eval_model(cfg.model, vocab, None)
    checkpoint.save_model(f"{tmp}/base", model[0], cfg)
    positions, tops = coldstart.training_positions(cfg, tokenizer, model)
    truth = {tuple(p.prefix_ids): tokenizer.token_text(p.target_id).strip() for p in positions}
    examples = coldstart.examples_at(cfg, tokenizer, positions, tops)
    special = tokenizer.special_ids()
    rows = []
    for ex in examples:
        with torch.no_grad():
            logits = model[0](
                torch.tensor([ex.prefix_ids]), torch.arange(len(ex.prefix_ids))[None], None
            )
        last = logits[0, -1, : tokenizer.vocab_size].clone()
        last[list(special)] = float("-inf")
        guess = tokenizer.token_text(int(last.argmax())).strip()
        answer = prompts.extract_prediction(tokenizer.decode(ex.response_ids[:-1]))
        rows.append((answer, guess, truth[tuple(ex.prefix_ids)]))
    return rows, coldstart.run(cfg), hand_counted_flops(cfg, examples, vocab)


def hand_counted_flops(cfg, examples, vocab: int) -> float:
    """The cold start's training FLOPs written out: per step, forward + backward (3 x forward)
    over its SFT rows, all padded to the step's longest, and over its NTP windows."""
    h, f, layers, q, kv = 64, 176, 2, 4 * 16, 2 * 2 * 16  # configs/tiny_cpu.yaml

    def token(context):  # one token's forward with logits, multiply-adds x 2
        per_layer = 2 * h * (q + kv) + 4 * context * q + 2 * q * h + 2 * h * 2 * f + 2 * f * h
        return layers * per_layer + 2 * h * vocab

    order = coldstart.in_epochs(examples, 3, cfg.parallel.seed)
    total = 0.0
    for first in range(0, len(order) - 3, 4):  # global batch 4, a last partial one dropped
        length = max(len(e.prompt_ids) + len(e.response_ids) for e in order[first : first + 4]) - 1
        total += 3 * (4 * length * token(length) + 2 * 48 * token(48))  # + 2 windows of 48
    return total


def learned(losses: list[float], epochs: int = 3) -> bool:
    """The SFT loss of the last epoch's steps is at least half a nat below the first epoch's."""
    per = len(losses) // epochs
    first, last = losses[:per], losses[-per:]
    return sum(last) / len(last) < sum(first) / len(first) - 0.5


def cold_starts_tiny(tmp: str, corpus: str):
    """cold_start_tiny, then the same cold start again with an optimizer that does nothing
    (lr 0), stopped one step early (--coldstart-max-steps): its SFT losses. One process for
    both (start-up is most of the cost)."""
    rows, losses, flops = cold_start_tiny(tmp, corpus)
    stop = ["--coldstart-max-steps", str(len(losses) - 1)]
    noop = config.parse([*_flags(tmp, corpus, "cs_noop"), "--lr", "0", *stop], world_size=1)
    return rows, losses, flops, coldstart.run(noop)


def test_cold_start_trains_on_its_own_guesses_never_the_truth_and_learns(tmp_path, tiny_corpus):
    """Fails for a cold start that boxes the true token, or whose optimizer does nothing."""
    rows, losses, flops, noop = spawn(cold_starts_tiny, 1, args=(str(tmp_path), tiny_corpus))[0]
    assert len(rows) >= 4
    for answer, guess, true in rows:
        assert answer == guess  # the box holds the model's own top-1 ...
        if guess != true:
            assert answer != true  # ... so never the true token where the two differ
    assert sum(guess != true for _, guess, true in rows) >= len(rows) // 2  # a real check
    assert len(losses) >= 3 and learned(losses), losses
    assert not learned(noop), noop  # the check catches an optimizer that does nothing
    assert len(noop) == len(losses) - 1  # --coldstart-max-steps cuts the run short
    assert (tmp_path / "cs" / checkpoint.TRACKER).read_text().strip() == "0"
    lines = (tmp_path / "cs" / "examples.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)
    assert "</think>" in json.loads(lines[0])["response"]
    record = json.loads((tmp_path / "cs" / "coldstart.json").read_text())
    assert len(record["ntp_loss"]) == len(losses)  # the NTP windows went into every step
    assert record["flops"] == pytest.approx(flops, rel=1e-12)  # the compute column's count


def test_think_restates_the_ending_and_continues_it_with_the_guess(tok):
    template = prompts.load_template("ntr_base")
    prefix = tok.encode("The capital of France is")
    examples = coldstart.build_examples(
        [prefix], [[tok.encode(" Paris")[0]]], tok, template, (40, 40), 0.0, seed=1, restate=2
    )
    response = tok.decode(examples[0].response_ids[:-1])
    assert response.startswith('The text ends " France is Paris". Most probable: "Paris".')
    assert prompts.extract_prediction(response) == "Paris"


def topk_at_tp2():
    """Both ranks' vocab_parallel_topk / argmax of one [5, 16] logits matrix split over TP=2,
    with the last 3 ids as padding."""
    from megatron.core import parallel_state as ps

    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    rank = ps.get_tensor_model_parallel_rank()
    shard = logits[:, rank * 8 : (rank + 1) * 8]
    group = ps.get_tensor_model_parallel_group()
    top = forward.vocab_parallel_topk(shard, 4, 13, group)
    return logits, top, forward.vocab_parallel_argmax(shard, 13, group)


def test_vocab_parallel_topk_at_tp2_equals_a_full_vocabulary_topk():
    for logits, top, argmax in spawn(topk_at_tp2, 2, tp=2):
        want = logits[:, :13].topk(4, dim=-1).indices  # padding ids 13..15 excluded
        assert torch.equal(top, want)
        assert torch.equal(argmax, want[:, 0])


def test_restate_and_guess_first_thinks_end_on_the_guess_and_the_exact_box_copies_it(tok):
    prefix = tok.encode("The capital of France is")
    paris = tok.encode(" Paris")[0]
    assert coldstart.restate_think_ids(prefix, paris, 6, 3) == prefix[-3:] + [paris] * 3
    assert coldstart.restate_think_ids(prefix, paris, 2, 5) == prefix[-1:] + [paris]  # cut to B
    assert coldstart.restate_think_ids(prefix, paris, 4, 0) == [paris] * 4  # guess_first
    tail = coldstart.box_ids(tok, paris, exact=True)
    assert paris in tail and tail[-1] == tok.eod  # the guess token itself, leading space kept
    assert tok.decode(tail[:-1]) == "\n</think>\n\\boxed{ Paris}"
    assert prompts.extract_prediction(tok.decode(tail[:-1])).strip() == "Paris"
    assert coldstart.box_ids(tok, tok.encode("{")[0], exact=True) is None
    template = prompts.load_template("ntr_restated")
    ex = coldstart.build_examples(
        [prefix], [[paris]], tok, template, (5, 5), 0.0, seed=1, think="guess_first",
        exact_box=True,
    )[0]  # fmt: skip
    prompt = tok.decode(ex.prompt_ids)
    assert prompt.endswith(
        "The text is: The capital of France is\n<think>\nThe text ends: capital of France is"
    )
    assert ex.response_ids[:5] == [paris] * 5 and ex.think_tokens == 5 and ex.guess_id == paris


def test_text_ending_restates_the_last_words():
    assert prompts.text_ending("Answer: it is 5 plus", 3) == " is 5 plus"
    assert prompts.text_ending("two words", 4) == " two words"
    assert prompts.text_ending("x\n= $5 and", 2) == " $5 and"
