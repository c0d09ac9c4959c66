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
    position ids and an attention mask, with full attention in every layer (a sliding window or a
    recurrent state would see the padded cache differently), and transformers' `DynamicCache`."""
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


def plan_prefix_batches(prefix_lens: Sequence[int], suffix_lens: Sequence[int], batch_size: int,
                        key_cost: float, forward_cost: float = 64.0) -> list[list[int]]:
    """Rows in batches of at most `batch_size` that waste little compute.

    Cost model: a batch computes max(suffix) positions per row, each costing `key_cost` (a token's
    linear-layer work in units of attention over one key) plus attention over max(prefix) cached
    keys and its own earlier positions; each forward pass costs `forward_cost` tokens more.
    The order: rows by suffix length within prefix-length buckets, the bucket width (1 keeps a
    subject's questions together, unbounded sorts every row by suffix length) chosen by that cost;
    then the batch boundaries along that order that minimize it (dynamic programming), so a few
    long rows do not pad a batch of short ones.
    """
    n = len(prefix_lens)
    batch_size = max(1, int(batch_size))
    if n == 0:
        return []

    def batch_cost(rows: Sequence[int]) -> float:
        longest = max(suffix_lens[i] for i in rows)
        return len(rows) * longest * (key_cost + max(prefix_lens[i] for i in rows) + longest / 2)

    best_order: list[int] = []
    best_cost = math.inf
    for width in (1, 16, 64, 256, 1024, None):
        order = sorted(range(n), key=lambda i: (prefix_lens[i] // width if width else 0, suffix_lens[i], prefix_lens[i], i))
        cost = sum(batch_cost(order[s:s + batch_size]) for s in range(0, n, batch_size))
        if cost < best_cost:
            best_order, best_cost = order, cost
    order = best_order
    overhead = forward_cost * key_cost
    total = [0.0] + [math.inf] * n  # total[j]: cheapest cost of the first j rows of `order`
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = widest = 0
        for size in range(1, min(batch_size, j) + 1):
            i = order[j - size]
            longest = max(longest, suffix_lens[i])
            widest = max(widest, prefix_lens[i])
            cost = total[j - size] + size * longest * (key_cost + widest + longest / 2) + overhead
            if cost < total[j]:
                total[j], start[j] = cost, j - size
    batches = []
    j = n
    while j > 0:
        batches.append(order[start[j]:j])
        j = start[j]
    return batches[::-1]


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
    """Score rows whose first `prefix_lens[i]` tokens are a prefix shared with their group.

    Each distinct prefix runs once (those a batch needs first, together) and its key/value cache is
    kept while rows still need it. A batch then runs only the rows' own tokens (suffixes), right-padded, over a
    cache holding each row's prefix (padded to the longest prefix of the batch, the padding
    masked out): attention mask over prefix + suffix, position ids continuing after each row's
    own prefix, and the log-softmax read at each row's last real position. Rows without a shared
    prefix (length 0) run in full in the same batches.
    """
    import torch
    from transformers import DynamicCache

    device = model_device(model)
    forward_args = forward_params(model)
    cache_arg = _cache_argument(forward_args)
    config = model.config
    n = len(encoded)
    suffix_lens = [len(encoded[i]) - prefix_lens[i] for i in range(n)]
    # A prefix is identified by its tokens: rows of one group share it, other groups have their own.
    prefix_key = [tuple(encoded[i][:prefix_lens[i]]) if prefix_lens[i] else None for i in range(n)]
    remaining: dict[tuple, int] = {}
    for key in prefix_key:
        if key is not None:
            remaining[key] = remaining.get(key, 0) + 1
    live: dict[tuple, list[tuple[Any, Any]]] = {}
    stats = {"computed_tokens": 0, "padded_tokens": 0, "prefix_groups": 0, "prefix_tokens": 0, "forward_passes": 0}
    logprobs: list[Any] = [None] * n

    def run_prefixes(keys: list[tuple]) -> None:
        """The new prefixes a batch needs, in one forward pass (right-padded: causal attention keeps
        every real position exact); each keeps its own slice of the key/value cache."""
        width = max(len(k) for k in keys)
        ids = torch.full((len(keys), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(keys), width), dtype=torch.long)
        for row, key in enumerate(keys):
            ids[row, :len(key)] = torch.tensor(key, dtype=torch.long)
            mask[row, :len(key)] = 1
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": True,
                                  "position_ids": torch.arange(width, device=device).expand(len(keys), -1)}
        if "logits_to_keep" in forward_args:
            kwargs["logits_to_keep"] = 1
        out = model(**kwargs)
        layers = _cache_layers(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
        for row, key in enumerate(keys):
            live[key] = [(k[row:row + 1, :, :len(key)], v[row:row + 1, :, :len(key)]) for k, v in layers]
        stats["prefix_groups"] += len(keys)
        stats["prefix_tokens"] += sum(len(k) for k in keys)
        stats["computed_tokens"] += sum(len(k) for k in keys)
        stats["padded_tokens"] += len(keys) * width
        stats["forward_passes"] += 1

    for batch in plan_prefix_batches(prefix_lens, suffix_lens, batch_size, _key_cost(model),
                                     _forward_cost(model, device)):
        rows = len(batch)
        longest_prefix = max(prefix_lens[i] for i in batch)
        longest_suffix = max(suffix_lens[i] for i in batch)
        input_ids = torch.full((rows, longest_suffix), pad_id, dtype=torch.long)
        attention = torch.zeros((rows, longest_prefix + longest_suffix), dtype=torch.long)
        positions = torch.zeros((rows, longest_suffix), dtype=torch.long)
        for row, i in enumerate(batch):
            p, s = prefix_lens[i], suffix_lens[i]
            input_ids[row, :s] = torch.tensor(encoded[i][p:], dtype=torch.long)
            attention[row, :p] = 1
            attention[row, longest_prefix:longest_prefix + s] = 1
            # Padding continues the count; its positions are never attended by a real token.
            positions[row] = torch.arange(p, p + longest_suffix)
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
                                  "position_ids": positions.to(device), "use_cache": bool(longest_prefix)}
        if longest_prefix:
            missing = list(dict.fromkeys(prefix_key[i] for i in batch if prefix_key[i] is not None and prefix_key[i] not in live))
            if missing:
                run_prefixes(missing)
            cache = DynamicCache(config=config)
            distinct = {prefix_key[i] for i in batch}
            if len(distinct) == 1:
                # One subject's rows: its cache expanded to the batch (no copy until the cache takes it).
                for layer, (keys, values) in enumerate(live[prefix_key[batch[0]]]):
                    cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer)
            else:
                # Each distinct prefix once, padded to the longest (the padding is masked), then gathered per row.
                order = list(distinct)
                index = torch.tensor([order.index(prefix_key[i]) for i in batch], device=device)
                template = live[next(k for k in order if k is not None)]
                for layer, (keys, values) in enumerate(template):
                    group_keys = keys.new_zeros((len(order), keys.shape[1], longest_prefix, keys.shape[3]))
                    group_values = values.new_zeros((len(order), values.shape[1], longest_prefix, values.shape[3]))
                    for g, key in enumerate(order):
                        if key is not None:
                            k, v = live[key][layer]
                            group_keys[g, :, :len(key)] = k[0]
                            group_values[g, :, :len(key)] = v[0]
                    cache.update(group_keys.index_select(0, index), group_values.index_select(0, index), layer)
            kwargs[cache_arg] = cache
        last = torch.tensor([suffix_lens[i] - 1 for i in batch], dtype=torch.long)
        if "logits_to_keep" in forward_args:
            # The vocabulary projection only at the rows' last positions (few distinct ones: rows are length-sorted).
            kept, column = torch.unique(last, return_inverse=True)
            kwargs["logits_to_keep"] = kept.to(device)
        else:
            column = last
        logits = model(**kwargs).logits
        logits = logits[torch.arange(rows), column.to(logits.device)].float()
        scores = torch.log_softmax(logits, dim=-1)[:, letter_ids].cpu()
        for row, i in enumerate(batch):
            logprobs[i] = scores[row].tolist()
            if prefix_key[i] is not None:
                remaining[prefix_key[i]] -= 1
                if remaining[prefix_key[i]] == 0:
                    live.pop(prefix_key[i], None)
        stats["computed_tokens"] += sum(suffix_lens[i] for i in batch)
        stats["padded_tokens"] += rows * longest_suffix
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
