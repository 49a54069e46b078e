"""Why the SmolLM2 cold start's NTR stays far below its NTP (docs/coldstart.md): on every 10th
position of the effect experiment's evaluation set, greedy, with the checkpoint converted to
Hugging Face (tools/convert_megatron_to_hf.py), the ntr_restated prompt at B = 8:
- how often the first response token is the checkpoint's own NTP top-1 at the position;
- of those, how often the box then holds that token;
- the mean probability of " is" (the fixed phrase's first token) and of the own top-1 there.
    PYTHONPATH=. python results/effect_smollm2/first_think.py HF_DIR [SET]
Measured on the cold start (results/effect_smollm2/README.md): 0.20, 0.17, 0.432, 0.214."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

from megatron_rmt import prompts
from megatron_rmt.tokenizer import build_tokenizer

hf = sys.argv[1]
rows = [json.loads(line) for line in open(sys.argv[2] if len(sys.argv) > 2 else
        "runs/effect_smollm2/results/set.jsonl")][1:]  # fmt: skip
tok = build_tokenizer("HuggingFaceTokenizer", hf, None, None, "endoftext")
template = prompts.load_template("ntr_restated")
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
is_id = tok.encode(" is")[0]
n = first = boxed = p_is = p_top = 0.0
for row in rows[::10]:
    prefix = row["prefix_ids"]
    with torch.no_grad():
        top = int(model(torch.tensor([prefix])).logits[0, -1].argmax())
        ids = prompts.build_prompt_ids(tok, template, prefix, 8)
        probs = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    out = out[0, len(ids) :].tolist()
    n += 1
    p_is += float(probs[is_id])
    p_top += float(probs[top])
    if out[0] == top:
        first += 1
        answer = prompts.extract_prediction(tok.decode(out))
        boxed += answer is not None and answer.strip() == tok.token_text(top).strip()
print(
    f"{int(n)} positions: first think token = own NTP top-1 {first / n:.2f}; of those boxed "
    f"{boxed / max(first, 1):.2f}; mean p(' is') {p_is / n:.3f}, p(own top-1) {p_top / n:.3f}"
)
