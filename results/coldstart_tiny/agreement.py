"""First-think agreement (docs/coldstart.md): on every third position of the held-out set, the
greedy top-1 at the first response token of the NTR prompt (B from argv[3], default 8) against
the same checkpoint's NTP top-1 at the position; prints six greedy responses.
    PYTHONPATH=. python results/coldstart_tiny/agreement.py CKPT TEMPLATE [B]
(set: /tmp/cs/set.jsonl, written by examples/coldstart_sweep.sh). Numbers: restated 0.38,
phrase 0.36, phrase_6ep 0.31 (ntr_restated); first 0.08, mix_exact 0.00 (ntr_base)."""

import sys

import torch

from megatron_rmt import config, launch, parallel, prompts
from megatron_rmt.evaluation import evalset, forward
from megatron_rmt.tokenizer import tokenizer_of

ck, tmpl = sys.argv[1], sys.argv[2]
cfg = config.parse(
    ["--config", "configs/tiny_cpu.yaml", "--load", ck, "--prompt-template", tmpl], world_size=1
)
parallel.init(1, 1, 1234, 10)
tok = tokenizer_of(cfg.data)
model = forward.build_eval_model(cfg.model, launch.model_vocab(cfg, tok), ck)[0]
_, pos = evalset.read_set("/tmp/cs/set.jsonl")
t = prompts.load_template(tmpl)
agree = hit_ntp = hit_first = 0
n = 0


def last_logits(ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[
            0, -1, : tok.vocab_size
        ]


for p in pos[::3]:
    a = int(last_logits(p.prefix_ids).argmax())
    prompt = prompts.build_prompt_ids(
        tok, t, p.prefix_ids, int(sys.argv[3]) if len(sys.argv) > 3 else 8
    )
    lg = last_logits(prompt)
    b = int(lg.argmax())
    agree += a == b
    hit_ntp += a == p.target_id
    hit_first += b == p.target_id
    n += 1
    if n <= 6:
        ids = list(prompt)
        for _ in range(16):
            nxt = int(last_logits(ids).argmax())
            ids.append(nxt)
            if nxt == tok.eod:
                break
        print(
            repr(tok.decode(p.prefix_ids[-6:])),
            "| NTP",
            repr(tok.token_text(a)),
            "| greedy resp",
            repr(tok.decode(ids[len(prompt) :])),
        )
print(
    f"n={n} first-think argmax == NTP argmax: {agree / n:.2f}; NTP acc {hit_ntp / n:.2f}; first-think acc {hit_first / n:.2f}"
)
