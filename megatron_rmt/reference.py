"""The frozen reference policy pi_ref of GRPO's KL term, built only when --kl-beta > 0.

Choice: the reference lives in the trainer, as a second copy of this rank's model stage in the
same TP/PP layout, rather than in a second vLLM server returning prompt log-probs.
- Exact: its log-probs come from the same kernels as the policy's (`step.reference_logprobs`
  then `losses.make_rl_loss_func`), so while the policy still equals the reference the KL and
  its gradient are exactly zero, not the trainer-vs-vLLM numerical gap.
- It works with either rollout engine and needs no second service to run and keep alive.
- Cost: one more copy of the weights per rank (no gradients, no optimizer state) and one
  forward-only pass over the RL microbatches per step.

Which weights: `--ref-load DIR` (any checkpoint the trainer can load, e.g. the converter's), or
else the weights the run starts from, copied at step 0. A resumed run must name them with
--ref-load: the checkpoint it resumes from holds trained weights, not the start.
"""

from megatron_rmt import checkpoint
from megatron_rmt.build import Trainable
from megatron_rmt.config import ConfigError, ModelConfig
from megatron_rmt.model import build_model, frozen


def build_reference(
    model_cfg: ModelConfig, vocab_size: int, trainable: Trainable, ref_load: str | None, step: int
) -> list:
    """This rank's stage of pi_ref, frozen, in eval mode (as a one-chunk model list)."""
    if ref_load is None and step > 0:
        raise ConfigError(
            f"--kl-beta > 0 and resuming at step {step}: pass --ref-load DIR with the weights "
            "the run started from (the reference policy)"
        )
    model = build_model(model_cfg, vocab_size, initialize=False)
    if ref_load is not None:
        checkpoint.load_model(ref_load, model)
    else:
        model.load_state_dict(trainable.model[0].module.state_dict())
    return frozen(model)
