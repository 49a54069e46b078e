"""Evaluation the way the RMT paper reports it (section 5, Table 1 and Table 3).

- `documents.py`: held-out documents as token ids (a JSONL "text" field or an indexed dataset).
- `evalset.py`: the evaluation set file (fixed positions, their difficulty) and its sampling.
- `forward.py`: forward-only passes over a model stage: entropy, NTP loss and greedy prediction
  of every position, vocab-parallel, through Megatron's pipeline schedule.
- `ntr.py`: next-token reasoning through the rollout engine, scored like the trainer.
- `report.py`: per-level accuracies of one model, and the side-by-side table of several.
`megatron_rmt/evaluate.py` is the command line over these.
"""
