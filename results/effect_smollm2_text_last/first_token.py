"""Does the prompt carry the model's next-token prediction over to its first thought? Forward
passes only, every 3rd position of the effect experiment's evaluation set (100), B = 8, for a
Hugging Face checkpoint (tools/convert_megatron_to_hf.py): how often the argmax of the first
response token equals the model's own NTP top-1 at the position, the probability it gives that
token and the true one, and the total-variation distance to the NTP distribution, for three
templates: ntr_restated (think opens after the text, its last words restated), ntr_text_last
(think opens before the text, the prompt ends with it), and the text twice (given, then
restated in full inside the think).
    PYTHONPATH=. python results/effect_smollm2_text_last/first_token.py HF_DIR [SET]
Output for the base, the fourth and the fifth cold start: first_token.txt."""

import dataclasses
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from megatron_rmt import prompts
from megatron_rmt.tokenizer import build_tokenizer

hf = sys.argv[1]
set_path = sys.argv[2] if len(sys.argv) > 2 else "results/effect_smollm2/set.jsonl"
rows = [json.loads(line) for line in open(set_path)][1:][::3]
tok = build_tokenizer("HuggingFaceTokenizer", hf, None, None, "endoftext")
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
restated = prompts.load_template("ntr_restated")
instruction = restated.user.split("\n")[0]
templates = {
    "restated": restated,
    "text_last": prompts.load_template("ntr_text_last"),
    "text_twice": dataclasses.replace(
        restated,
        name="text_twice",
        user=instruction + "\nThe text is: ${text}\n<think>\nThe text ends: ${text}",
    ),
}


def next_probs(ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)


sums = {name: torch.zeros(5) for name in templates}
ntp_right = ntp_p_true = 0.0
for row in rows:
    prefix, target = row["prefix_ids"], row["target_id"]
    p = next_probs(prefix)
    top = int(p.argmax())
    ntp_right += top == target
    ntp_p_true += float(p[target])
    for name, template in templates.items():
        q = next_probs(prompts.build_prompt_ids(tok, template, prefix, 8))
        first = int(q.argmax())
        tv = 0.5 * float((p - q).abs().sum())
        sums[name] += torch.tensor(
            [first == top, float(q[top]), float(q[target]), tv, first == target]
        )
n = len(rows)
print(
    f"{hf}: {n} positions; NTP top-1 accuracy {ntp_right / n:.3f}, NTP mean p(true) {ntp_p_true / n:.3f}"
)
for name, s in sums.items():
    s = (s / n).tolist()
    print(
        f"  {name:10s} first-token argmax = NTP top-1 {s[0]:.3f}, p(NTP top-1) {s[1]:.3f}, "
        f"p(true) {s[2]:.3f}, TV to NTP {s[3]:.3f}, argmax = true {s[4]:.3f}"
    )
