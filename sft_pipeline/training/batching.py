"""Padded micro-batches on a budget: split a micro-batch into row groups of similar length, each cut to its own longest row.

A padded micro-batch costs `rows x longest row` tokens of activations and compute, whatever its
rows' real lengths. On a CPU those activations dominate the memory of a step (SmolLM2-135M with
LoRA keeps about 1.4 MiB per token for the backward pass: 8 rows of 600 tokens hold 6.6 GiB), and
one long row makes every other row of its batch pay for its length.

`plan_row_groups` sorts a micro-batch's rows by length and cuts them into contiguous groups whose
`rows x longest row` stays within `max_tokens` (a row longer than the budget goes alone), choosing
the cut that processes the fewest padded tokens (plus a small fixed cost per group, so a batch is
not shredded into single rows for a few pad tokens). The trainer runs forward and backward on each
group and accumulates the gradients within the same optimizer step; with the loss divided by the
step's total number of labeled tokens, the update equals that of the unsplit micro-batch (up to
floating-point summation order), so the optimizer sees exactly the batch it was configured for.
"""

from __future__ import annotations

from typing import Any

# The fixed cost of one more forward/backward pass, in padded tokens (Python and kernel-launch work per
# layer, smaller matrix products): measured on CPU as tens of tokens; keeps near-equal rows together.
GROUP_OVERHEAD_TOKENS = 64
# Row groups are cut to their longest row rounded up to this many tokens. On a CPU every distinct
# matrix shape costs oneDNN a newly compiled plan (bf16; see performance.bound_kernel_caches); fewer
# widths let plans be reused: bench/training.py on SmolLM2-135M, bf16, 431.6 tokens/s instead of 382.7 (two runs),
# for 5.7% pad tokens instead of 1.7%. Pads are masked and unlabeled: the update is the same.
GROUP_WIDTH_MULTIPLE = 32


def plan_row_groups(lengths: list[int], max_tokens: int, overhead_tokens: int = GROUP_OVERHEAD_TOKENS) -> list[list[int]]:
    """Row indices grouped so that each group's `len(group) * longest` is at most `max_tokens`.

    Rows are taken longest first and each group is a run of consecutive rows in that order; among
    those cuts, the one with the fewest padded tokens plus `overhead_tokens` per group (dynamic
    programming over the sorted rows). A single row longer than `max_tokens` forms its own group.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    inf = float("inf")
    best = [0.0] + [inf] * n  # best[j]: cost of grouping the j longest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # group = sorted rows i..j-1, its longest is row i
            size = (j - i) * lengths[order[i]]
            if j - i > 1 and size > max_tokens:
                continue
            cost = best[i] + size + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def split_padded_batch(inputs: dict[str, Any], max_tokens: int, overhead_tokens: int = GROUP_OVERHEAD_TOKENS,
                       width_multiple: int = GROUP_WIDTH_MULTIPLE) -> list[dict[str, Any]] | None:
    """The row groups of a padded batch (`attention_mask` of shape rows x length), each cut to its longest row
    rounded up to `width_multiple` tokens (at most the batch's width).

    None when the batch is not a padded one (padding-free and packed batches are one row), has one
    row, or would be one group anyway with no column to cut.
    """
    import torch

    mask = inputs.get("attention_mask")
    ids = inputs.get("input_ids")
    if not isinstance(mask, torch.Tensor) or not isinstance(ids, torch.Tensor) or mask.dim() != 2 \
            or ids.shape != mask.shape or ids.shape[0] < 2:
        return None
    rows, width = ids.shape
    # The length of a row is up to its last real token (the collator pads on the right).
    positions = torch.arange(1, width + 1, device=mask.device)
    lengths = (mask.ne(0) * positions).amax(dim=1).tolist()
    groups = plan_row_groups(lengths, max_tokens, overhead_tokens)
    if len(groups) == 1 and max(lengths) == width:
        return None
    out = []
    for group in groups:
        index = torch.tensor(group, device=ids.device)
        keep = min(width, -(-max(lengths[i] for i in group) // width_multiple) * width_multiple)
        out.append({key: value.index_select(0, index)[:, :keep]
                    if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (rows, width) else value
                    for key, value in inputs.items()})
    return out


def labeled_tokens(inputs: dict[str, Any]):
    """Positions a causal-LM loss is computed on: next-token labels that are not -100."""
    if "shift_labels" in inputs:
        return inputs["shift_labels"].ne(-100).sum()
    return inputs["labels"][..., 1:].ne(-100).sum()
