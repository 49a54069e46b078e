"""The embedded rollout engine: sampling over the trainer's own Megatron model, with TP and PP.

The default when no rollout service is configured, so the whole method runs on a bare machine.
Every rank of a model-parallel replica runs `generate` together. Each request's G samples share
one prompt, so they form a batch of equal length and need no padding. Decoding uses Megatron's
own static KV cache (`StaticInferenceContext`): one prefill of the prompt, then one forward per
new token, each through Megatron's pipeline schedule (forward only), so every stage keeps its own
cache and only `[G, 1, h]` activations cross stages. The model materialises the last position's
logits only, gathered over TP (`[G, v]`); the last stage samples with a generator seeded
identically on its TP ranks (so they agree without talking) and broadcasts the tokens to the
other stages. It is meant for small models and short budgets (the CPU run, tests): real runs use
the vLLM service.
"""

import torch
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rmt import parallel, platform
from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult


class EmbeddedEngine:
    collective = True

    def __init__(self, model: list, vocab_size: int, eos_id: int):
        self.model = model  # this rank's DDP-wrapped stage(s)
        self.vocab_size = vocab_size  # real vocabulary; padded rows are never sampled
        self.eos_id = eos_id
        self.version = 0

    def sync_weights(self, version: int) -> None:
        self.version = version  # it samples from the live weights: nothing to copy

    @torch.no_grad()
    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        return [self._sample_group(r) for r in requests]

    def _sample_group(self, req: RolloutRequest) -> RolloutResult:
        gen = torch.Generator().manual_seed(req.seed)
        cache = StaticInferenceContext(req.n, len(req.prompt_ids) + req.max_tokens)
        step_input = torch.tensor([req.prompt_ids] * req.n, device=platform.device())  # [G, P]
        done = torch.zeros(req.n, dtype=torch.bool)
        new_tokens, logprobs = [], []
        for chunk in self.model:
            chunk.eval()
        try:
            for _ in range(req.max_tokens):
                logits = self._next_token_logits(step_input, cache)  # [G, v] last stage, else None
                picked = None
                if logits is not None:
                    picked = _sample(logits, self.vocab_size, req.temperature, req.top_p, gen)
                token, logp = parallel.broadcast_object_from_last_stage(picked)
                token = torch.where(done, torch.full_like(token, self.eos_id), token)
                new_tokens.append(token)
                logprobs.append(logp)
                done |= token == self.eos_id
                if done.all():
                    break
                step_input = token.to(step_input.device)[:, None]  # [G, 1]
        finally:
            for chunk in self.model:
                chunk.train()
        responses, response_logprobs = _trim(
            torch.stack(new_tokens, 1).tolist(), torch.stack(logprobs, 1).tolist(), self.eos_id
        )
        return RolloutResult(responses, response_logprobs, weight_version=self.version)

    def _next_token_logits(self, tokens: torch.Tensor, cache) -> torch.Tensor | None:
        """Feed `tokens` [G, s] after what the cache holds; the next-token logits [G, v]."""
        g, s = tokens.shape
        offset = cache.sequence_len_offset
        captured = []

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            positions = torch.arange(offset, offset + s, device=batch.device).expand(g, s)
            out = model(batch, positions, None, inference_context=cache, runtime_gather_output=True)
            return out, _capture

        def _capture(output):  # [G, 1, v] on the last stage: last position, TP-gathered
            captured.append(output[:, -1, :])
            return output.new_zeros(()), {}

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=self.model,
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=g,
            forward_only=True,
        )
        cache.sequence_len_offset += s
        return captured[0].float() if ps.is_pipeline_last_stage() else None


def _sample(
    logits: torch.Tensor, vocab_size: int, temperature: float, top_p: float, gen: torch.Generator
):
    """Nucleus sampling at `temperature` among the real tokens; (tokens [G], log-probs [G]).

    The log-prob is that of the tempered distribution over the whole padded vocabulary, before
    the top-p cut: exactly what the trainer recomputes for the RL loss. Padding rows are never
    sampled (they are no tokens)."""
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [G, v padded]
    probs = logp[:, :vocab_size].exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    token = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1)  # [G]
    return token, logp.cpu().gather(1, token[:, None]).squeeze(1)


def _trim(tokens: list[list[int]], logprobs: list[list[float]], eos_id: int):
    """Cut each row after its first EOS (kept: the model chose to stop there)."""
    cut = [row.index(eos_id) + 1 if eos_id in row else len(row) for row in tokens]
    return (
        [row[:n] for row, n in zip(tokens, cut, strict=True)],
        [row[:n] for row, n in zip(logprobs, cut, strict=True)],
    )
