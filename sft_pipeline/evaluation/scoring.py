"""MMLU multiple-choice scoring in one forward pass per question (shared prompt prefixes computed once per subject),
and accuracy summaries with confidence intervals."""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd

from sft_pipeline.evaluation.mmlu import LETTERS
from sft_pipeline.evaluation.prompts import build_mmlu_contexts, shared_prefix_groups
from sft_pipeline.evaluation.statistics import wilson_interval
from sft_pipeline.modeling import encode_context, forward_params, left_padded_batches, model_device

PREDICTION_COLUMNS = (
    "question_id", "subject", "category", "answer", "predicted", "correct",
    *(f"logprob_{x}" for x in LETTERS),
)


def letter_token_ids(tokenizer: Any, prefix: str = " ") -> list[int]:
    """Token ids of " A".." D" (plain mode) or "A".."D" (chat mode, `prefix=""`).

    Each must be one token for the one-pass scoring to be exact.
    """
    ids = []
    for letter in LETTERS:
        enc = tokenizer.encode(f"{prefix}{letter}", add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(
                f"{prefix + letter!r} is {len(enc)} tokens {enc} for this tokenizer; one-pass MMLU scoring "
                "needs each answer letter (with its leading space in plain mode) to be a single token"
            )
        ids.append(int(enc[0]))
    return ids


def score_multiple_choice(
    model: Any,
    tokenizer: Any,
    questions: pd.DataFrame,
    batch_size: int = 8,
    fewshot: pd.DataFrame | None = None,
    prompt_format: str = "plain",
    prefix_cache: bool = True,
) -> pd.DataFrame:
    """Score each question with one forward pass; returns `PREDICTION_COLUMNS` in input order.

    The continuations " A".." D" ("A".."D" in chat mode) are single tokens sharing the context,
    so log P(letter | context) is the log-softmax at the last context position, read at the
    four letter ids. In chat mode the context ends with the template's newline, which the
    harness moves into the continuation: its log-probability is the same for all four letters,
    so the prediction is the same and the reported log-likelihoods omit that shared term.

    `prefix_cache` (default): the tokens every prompt of a subject shares (description, k-shot
    examples, chat header: `prompts.shared_prefix_groups`, then the longest common token prefix)
    run once per subject; each question runs only its own tokens over that key/value cache. The
    same tokens attend to the same tokens at the same positions as without it, so the scores are
    the same up to float rounding. Models it does not apply to (`prefix_cache_supported`) and
    `prefix_cache=False` take the uncached path. `predictions.attrs["scoring"]` says which path
    ran and how many tokens it computed.
    """
    import torch

    letter_ids = letter_token_ids(tokenizer, prefix=" " if prompt_format == "plain" else "")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    contexts = build_mmlu_contexts(tokenizer, questions, fewshot, prompt_format)
    encoded = [encode_context(tokenizer, c) for c in contexts]
    if max_len:
        # Keep the end: the "Answer:" position is what is scored.
        encoded = [ids[-max_len:] for ids in encoded]

    cached = bool(prefix_cache) and prefix_cache_supported(model)
    with torch.inference_mode():
        if cached:
            prefix_lens = shared_prefix_lengths(encoded, shared_prefix_groups(questions))
            logprobs, stats = _score_with_prefix_cache(model, encoded, prefix_lens, letter_ids, batch_size, pad_id)
        else:
            logprobs, stats = _score_uncached(model, encoded, letter_ids, batch_size, pad_id)

    out = pd.DataFrame({
        "question_id": questions["question_id"].tolist(),
        "subject": questions["subject"].tolist(),
        "category": (questions["category"].tolist() if "category" in questions.columns
                     else [None] * len(questions)),
        "answer": questions["answer"].tolist(),
    })
    for k, letter in enumerate(LETTERS):
        out[f"logprob_{letter}"] = [lp[k] for lp in logprobs]
    # Ties (practically never) go to the earliest letter, as argmax does.
    out["predicted"] = [LETTERS[max(range(4), key=lambda k: lp[k])] for lp in logprobs]
    out["correct"] = out["predicted"] == out["answer"]
    out = out.loc[:, list(PREDICTION_COLUMNS)]
    out.attrs["scoring"] = {"prefix_cache": cached, "context_tokens": sum(len(ids) for ids in encoded), **stats}
    return out


def _score_uncached(model: Any, encoded: list[list[int]], letter_ids: list[int], batch_size: int,
                    pad_id: int) -> tuple[list[Any], dict[str, int]]:
    """Every context in full, length-sorted, left-padded batches (every row's last token in the last column)."""
    import torch

    device = model_device(model)
    forward_args = forward_params(model)
    logprobs: list[Any] = [None] * len(encoded)
    stats = {"computed_tokens": 0, "padded_tokens": 0, "prefix_groups": 0, "prefix_tokens": 0, "forward_passes": 0}
    for idx, input_ids, attention in left_padded_batches(encoded, batch_size, pad_id):
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
        if "position_ids" in forward_args:
            # Left padding would otherwise shift every position; absolute-position models care.
            kwargs["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0).to(device)
        if "logits_to_keep" in forward_args:
            kwargs["logits_to_keep"] = 1  # only the last position's vocab projection
        if "use_cache" in forward_args:
            kwargs["use_cache"] = False
        logits = model(**kwargs).logits[:, -1, :].float()
        scores = torch.log_softmax(logits, dim=-1)[:, letter_ids].cpu()
        for row, i in enumerate(idx):
            logprobs[i] = scores[row].tolist()
        stats["computed_tokens"] += int(attention.sum())
        stats["padded_tokens"] += int(attention.numel())
        stats["forward_passes"] += 1
    return logprobs, stats


# --- shared prefixes: computed once, their key/value cache reused --------------------------------


def _cache_argument(forward_args: set[str]) -> str | None:
    """The forward argument that takes a key/value cache (`cache` since transformers 5.2x, `past_key_values` before)."""
    return next((name for name in ("cache", "past_key_values") if name in forward_args), None)


def prefix_cache_supported(model: Any) -> bool:
    """Whether the prefix cache applies: a decoder-only model whose forward takes a key/value cache,
    position ids and an attention mask, with the sdpa or eager attention (they take a custom 4D
    mask) and full attention in every layer (a sliding window or a recurrent state would see the
    packed row differently), and transformers' `DynamicCache`."""
    forward_args = forward_params(model)
    if _cache_argument(forward_args) is None or not {"position_ids", "attention_mask"} <= forward_args:
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers import DynamicCache  # noqa: F401
    except ImportError:
        return False
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False  # the packed passes need a 4D attention mask (flash attention takes none)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return not getattr(text, "sliding_window", None) or getattr(text, "use_sliding_window", True) is False


def shared_prefix_lengths(encoded: Sequence[Sequence[int]], groups: Sequence[Sequence[int]]) -> list[int]:
    """Per row, how many leading tokens it shares with every other row of its group (0: none shared).

    The longest common token prefix of the group's rows, at most each row's length minus one (a
    row keeps at least its last token, where it is scored). Groups of one row share nothing. Taken
    on the encoded contexts, so the cached path runs exactly the uncached path's tokens.
    """
    lengths = [0] * len(encoded)
    for group in groups:
        if len(group) < 2:
            continue
        rows = [encoded[i] for i in group]
        limit = min(len(r) for r in rows) - 1
        first = rows[0]
        shared = 0
        while shared < limit and all(r[shared] == first[shared] for r in rows):
            shared += 1
        for i in group:
            lengths[i] = shared
    return lengths


def plan_packed_forwards(groups: Sequence[int], prefix_lens: Sequence[int], suffix_lens: Sequence[int],
                         max_questions: int, key_cost: float, forward_cost: float = 64.0) -> list[list[int]]:
    """Rows (questions) in forward passes of at most `max_questions`, each pass one packed row.

    `groups[i]`: the row's prefix group (rows sharing a prefix share an id); `prefix_lens[i]`: the
    group's prefix length (0: the row shares nothing). Rows keep their group's order (groups in
    order of first appearance, rows in input order within), so a group's rows are contiguous and a
    group cut between two passes continues in the next one over its cached prefix.

    A pass computes T tokens (its rows' suffixes, plus the prefix of every group that starts in it)
    over C cached keys (the prefix of the group it continues, if any). Cost model, per layer, in
    units of attention over one key: T x key_cost (a token's linear-layer work) + T x (C + T) (the
    attention the packed row's mask spans: every query against every key, the masked ones
    included) + forward_cost x key_cost (a pass's fixed cost, `forward_cost` tokens). The pass
    boundaries along the order minimize the sum (dynamic programming): big enough that the fixed
    cost is shared, small enough that the masked attention stays small next to the linear work.
    """
    n = len(groups)
    max_questions = max(1, int(max_questions))
    if n == 0:
        return []
    first: dict[int, int] = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    order = sorted(range(n), key=lambda i: (first[groups[i]], i))
    g = [groups[i] for i in order]
    p = [prefix_lens[i] for i in order]
    s = [suffix_lens[i] for i in order]
    overhead = forward_cost * key_cost
    total = [0.0] + [math.inf] * n  # total[j]: cheapest cost of the first j rows of `order`
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        suffix = present = 0
        for i in range(j - 1, max(0, j - max_questions) - 1, -1):
            suffix += s[i]
            if i == j - 1 or g[i] != g[i + 1]:
                present += p[i]  # a group newly in the window: its prefix is in the pass
            cached = p[i] if i > 0 and g[i - 1] == g[i] else 0
            tokens = suffix + present - cached
            cost = total[i] + tokens * (key_cost + cached + tokens) + overhead
            if cost < total[j]:
                total[j], start[j] = cost, i
    passes = []
    j = n
    while j > 0:
        passes.append(order[start[j]:j])
        j = start[j]
    return passes[::-1]


def _key_cost(model: Any) -> float:
    """A token's linear-layer work per layer in units of attention over one key (about 3,000 for SmolLM2-135M)."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(text, "head_dim", 0) or (hidden // heads if heads else 0))
    try:
        per_layer = model.num_parameters(exclude_embeddings=True) / max(1, layers)
    except (AttributeError, TypeError):
        per_layer = 12 * hidden * hidden
    return per_layer / max(1, 2 * heads * head_dim) if hidden else 1000.0


def _forward_cost(model: Any, device: Any) -> float:
    """A forward pass's fixed cost (Python, kernel launches, reading the weights) in tokens of the
    model's compute: about 1 GFLOP on a CPU, 1 TFLOP on a GPU, at least 64 tokens."""
    try:
        params = sum(p.numel() for p in model.parameters())
    except (AttributeError, TypeError):
        return 64.0
    flops = 1e12 if getattr(device, "type", str(device)) == "cuda" else 1e9
    return max(64.0, flops / max(1, 2 * params))


def _cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) per layer of a transformers cache, each [batch, kv heads, tokens, head dim]."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


def _score_with_prefix_cache(model: Any, encoded: list[list[int]], prefix_lens: list[int], letter_ids: list[int],
                             batch_size: int, pad_id: int) -> tuple[list[Any], dict[str, int]]:
    """Score rows whose first `prefix_lens[i]` tokens are a prefix shared with their group, packed.

    Each forward pass is one row (batch 1) holding, for each group it scores, the group's prefix
    (once) followed by the suffixes (each question's own tokens) of up to `batch_size` questions,
    back to back: no padding, and every prefix's keys and values exist once, never copied per
    question. A 4D attention mask lets each suffix token see its own prefix and its own earlier
    tokens only (a prefix token: its prefix's earlier tokens), position ids restart after the
    prefix for each suffix, and the vocabulary projection runs only at each suffix's last token.
    A group cut between two passes continues in the next one over a key/value cache holding its
    prefix (batch 1, taken from the pass that computed it). Rows without a shared prefix (length
    0) are packed as whole sequences. Boundaries: `plan_packed_forwards`.
    """
    import torch

    device = model_device(model)
    forward_args = forward_params(model)
    cache_arg = _cache_argument(forward_args)
    n = len(encoded)
    suffix_lens = [len(encoded[i]) - prefix_lens[i] for i in range(n)]
    # A prefix is identified by its tokens: rows of one group share it, other groups have their own.
    ids_of: dict[tuple, int] = {}
    groups = [ids_of.setdefault(tuple(encoded[i][:prefix_lens[i]]), len(ids_of)) if prefix_lens[i] else -1 - i
              for i in range(n)]
    additive = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
    stats = {"computed_tokens": 0, "padded_tokens": 0, "prefix_groups": 0, "prefix_tokens": 0, "forward_passes": 0,
             "attention_pairs": 0}
    logprobs: list[Any] = [None] * n
    saved: tuple[int, list[tuple[Any, Any]]] | None = None  # (group, prefix keys/values per layer) of a cut group

    passes = plan_packed_forwards(groups, prefix_lens, suffix_lens, batch_size, _key_cost(model),
                                  _forward_cost(model, device))
    for number, rows in enumerate(passes):
        continued = saved is not None and saved[0] == groups[rows[0]]
        cached = prefix_lens[rows[0]] if continued else 0
        ids: list[int] = []
        positions: list[int] = []
        spans: list[tuple[int, int, int, int]] = []  # (query start, query end, prefix key start, prefix key end)
        last: list[int] = []
        prefix_at: dict[int, int] = {}  # group -> key index of its prefix's first token
        for i in rows:
            p = prefix_lens[i]
            if p and groups[i] not in prefix_at:
                if continued and groups[i] == groups[rows[0]]:
                    prefix_at[groups[i]] = 0
                else:
                    prefix_at[groups[i]] = cached + len(ids)
                    spans.append((len(ids), len(ids) + p, 0, 0))
                    ids += encoded[i][:p]
                    positions += range(p)
                    stats["prefix_groups"] += 1
                    stats["prefix_tokens"] += p
            begin = len(ids)
            ids += encoded[i][p:]
            positions += range(p, len(encoded[i]))
            key = prefix_at.get(groups[i], 0)
            spans.append((begin, len(ids), key, key + p))
            last.append(len(ids) - 1)
        tokens = len(ids)
        visible = torch.zeros((tokens, cached + tokens), dtype=torch.bool)
        for q0, q1, k0, k1 in spans:
            visible[q0:q1, k0:k1] = True  # the segment's prefix (empty for a prefix itself)
            visible[q0:q1, cached + q0:cached + q1] = torch.ones((q1 - q0, q1 - q0), dtype=torch.bool).tril()
        if additive:
            mask = torch.zeros(visible.shape, dtype=model.dtype).masked_fill(~visible, torch.finfo(model.dtype).min)
        else:
            mask = visible
        # Keep the keys/values of the last group's prefix when the next pass continues that group.
        keep = number + 1 < len(passes) and groups[passes[number + 1][0]] == groups[rows[-1]] and prefix_lens[rows[-1]] > 0
        kwargs: dict[str, Any] = {"input_ids": torch.tensor([ids], device=device),
                                  "position_ids": torch.tensor([positions], device=device),
                                  "attention_mask": mask[None, None].to(device), "use_cache": bool(continued or keep)}
        if continued:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            for layer, (keys, values) in enumerate(saved[1]):
                cache.update(keys, values, layer)
            kwargs[cache_arg] = cache
        if "logits_to_keep" in forward_args:
            kwargs["logits_to_keep"] = torch.tensor(last, device=device)
            column = torch.arange(len(last))
        else:
            column = torch.tensor(last)
        out = model(**kwargs)
        logits = out.logits[0, column.to(out.logits.device)].float()
        scores = torch.log_softmax(logits, dim=-1)[:, letter_ids].cpu()
        for row, i in enumerate(rows):
            logprobs[i] = scores[row].tolist()
        if keep:
            if not (continued and groups[rows[-1]] == groups[rows[0]]):
                start = prefix_at[groups[rows[-1]]]
                layers = _cache_layers(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
                saved = (groups[rows[-1]], [(k[:, :, start:start + prefix_lens[rows[-1]]],
                                             v[:, :, start:start + prefix_lens[rows[-1]]]) for k, v in layers])
        else:
            saved = None
        stats["computed_tokens"] += tokens
        stats["padded_tokens"] += tokens
        stats["attention_pairs"] += tokens * (cached + tokens)
        stats["forward_passes"] += 1
    return logprobs, stats


def summarize_accuracy(predictions: pd.DataFrame) -> dict[str, Any]:
    """Micro and macro (mean over subjects) accuracy, per subject and per category, with 95% CIs.

    `accuracy_ci` and the groups' `ci` are Wilson intervals; `macro_accuracy_ci` is the normal
    approximation with the per-subject binomial variances (subjects weighted equally).
    """
    n = int(len(predictions))
    if n == 0:
        return {"accuracy": None, "accuracy_ci": None, "macro_accuracy": None, "macro_accuracy_ci": None,
                "num_questions": 0, "per_subject": {}, "per_category": {}}
    correct = predictions["correct"].astype(bool)
    per_subject = _grouped_accuracy(correct, predictions["subject"])
    per_category = (_grouped_accuracy(correct, predictions["category"])
                    if "category" in predictions.columns else {})
    macro = sum(v["accuracy"] for v in per_subject.values()) / len(per_subject)
    macro_se = math.sqrt(sum(v["accuracy"] * (1 - v["accuracy"]) / v["n"] for v in per_subject.values())) / len(per_subject)
    z = 1.959963984540054
    return {
        "accuracy": float(correct.mean()),
        "accuracy_ci": list(wilson_interval(int(correct.sum()), n)),
        "macro_accuracy": float(macro),
        "macro_accuracy_ci": [max(0.0, macro - z * macro_se), min(1.0, macro + z * macro_se)],
        "num_questions": n,
        "per_subject": per_subject,
        "per_category": per_category,
    }


def _grouped_accuracy(correct: pd.Series, keys: pd.Series) -> dict[str, dict[str, Any]]:
    grouped = correct.groupby(keys.to_numpy(), sort=True)
    return {str(k): {"accuracy": float(g.mean()), "n": int(len(g)), "ci": list(wilson_interval(int(g.sum()), int(len(g))))}
            for k, g in grouped}
