"""Where the boxed answer comes from, greedy, on every 10th position of the evaluation set
(30), B = 8, for a Hugging Face checkpoint and a template: how often the first response token
is the checkpoint's own NTP top-1 at the position, how often the box holds the first think
token, and how often it holds the last one (the guess-repeated cold start teaches all three to
be the same token).
    PYTHONPATH=. python results/effect_smollm2_text_last/think_drift.py HF_DIR TEMPLATE [SET]
Output for the fourth and fifth cold starts: think_drift.txt."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

from megatron_rmt import prompts
from megatron_rmt.rewards import match_reward
from megatron_rmt.tokenizer import build_tokenizer

hf, template_name = sys.argv[1], sys.argv[2]
set_path = sys.argv[3] if len(sys.argv) > 3 else "results/effect_smollm2/set.jsonl"
rows = [json.loads(line) for line in open(set_path)][1:][::10]
tok = build_tokenizer("HuggingFaceTokenizer", hf, None, None, "endoftext")
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
template = prompts.load_template(template_name)
first_is_top = box_is_first = box_is_last = right = 0
for row in rows:
    prefix = row["prefix_ids"]
    ids = prompts.build_prompt_ids(tok, template, prefix, 8)
    with torch.no_grad():
        top = int(model(torch.tensor([prefix])).logits[0, -1].argmax())
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :]
    out = out.tolist()
    response = tok.decode(out)
    thinking, _ = prompts.split_response(response)
    think_ids = tok.encode(thinking.rstrip("\n")) if thinking else []
    answer = prompts.extract_prediction(response)
    first_is_top += out[0] == top
    if answer is not None and think_ids:
        box_is_first += match_reward(answer, tok.token_text(out[0]))
        box_is_last += match_reward(answer, tok.decode(think_ids[-1:]))
    right += match_reward(answer, tok.token_text(row["target_id"]))
n = len(rows)
print(
    f"{hf} ({template_name}), {n} positions, greedy: first think token = own NTP top-1 "
    f"{first_is_top / n:.2f}; box = first think token {box_is_first / n:.2f}; box = last think "
    f"token {box_is_last / n:.2f}; box = true token {right / n:.2f}"
)
