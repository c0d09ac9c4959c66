"""The LM-head loss on a CPU: score only the positions that have a label, a vocabulary tile at a time.

TRL's `SFTTrainer` replaces the model's forward with a fused LM head (`trl.trainer.utils.add_fused_lm_head`)
that never builds the `(batch, seq, vocab)` logits. On CUDA with Triton it projects only the labeled
positions; elsewhere it projects *every* position (prompt and pad tokens included), in tiles of
4,096 tokens x 32,768 vocabulary columns that its torch fallback turns into half a dozen fp32
temporaries of 512 MiB each. For SmolLM2-135M (vocabulary 49,152, a 28M-weight head: a fifth of
the model) that was the largest transient allocation of a CPU training step, and most of its
work was thrown away: in the ticket-triage demo under a tenth of the tokens carry a label.

`compact_lm_head` swaps in a forward that gathers the labeled positions first and projects only
those, in tiles of `LM_HEAD_VOCAB_CHUNK` columns, through the same TRL kernel
(`trl.kernels.ChunkedLogProbFunction`), returning the same `FusedCausalLMOutput`: the loss, the
per-token log-probabilities, entropy and top-1 flags are those of the TRL head (tested), so the
trainer's loss, `mean_token_accuracy` and `entropy` metrics are unchanged.
"""

from __future__ import annotations

import functools
import logging
import types

logger = logging.getLogger(__name__)

# Vocabulary columns per projection tile: a tile of n labeled tokens is n x 8,192 fp32 (64 MiB at n = 2,048).
LM_HEAD_VOCAB_CHUNK = 8192
# What SFTTrainer.compute_loss reads from the fused output (loss, mean_token_accuracy, entropy).
_OUTPUTS = ("log_probs", "entropy", "is_top1")
# Config fields that rescale or cap the logits; a model that sets any keeps TRL's own head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling", "output_router_logits")


def compact_lm_head(model, vocab_chunk: int = LM_HEAD_VOCAB_CHUNK) -> bool:
    """Make `model(..., labels=..., fused_lm_head=True)` project only the labeled positions.

    `model` is the causal LM whose forward TRL's `add_fused_lm_head` patched (under PEFT, the base
    model). Calls without `fused_lm_head` (generation, plain forwards) go to the previous forward
    unchanged. Returns False, changing nothing, where this TRL has no fused head or the model
    rescales its logits (softcapping, logit scales) or is a mixture of experts.
    """
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:
        return False
    previous = model.forward
    text_config = model.config.get_text_config()
    if any(getattr(text_config, name, None) not in (None, False) for name in _LOGIT_TRANSFORMS):
        return False
    if not hasattr(model, "base_model") or model.get_output_embeddings() is None:
        return False

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or labels is None and shift_labels is None:
            return previous(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                            num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts label t + 1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        head = self.get_output_embeddings()
        per_token = ChunkedLogProbFunction.apply(hidden[mask], head.weight, head.bias, labels[mask], 1.0, vocab_chunk,
                                                 None, 1.0, _OUTPUTS)
        # Back to (batch, seq) with zeros where there is no label; masked_scatter keeps a batch without
        # labels connected to the graph (a differentiable zero), as TRL's head does.
        log_probs, entropy, _, _, is_top1 = (None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)
                                             for x in per_token)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denominator, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return True
