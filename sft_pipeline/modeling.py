"""Load a causal LM and its tokenizer for scoring and generation (device, dtype, padding, adapter), and greedy generation.

Imports only torch, transformers and (for adapters) peft, lazily, so it runs on a GPU box.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterator, Sequence


def default_device(device: str | None = None) -> str:
    """`device` when given, else "cuda" when a GPU is visible, else "cpu"."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def eval_dtype(device: str):
    """bf16 on GPUs that support it; fp32 elsewhere (bf16 matmuls on CPU are slow and lossy)."""
    import torch

    on_cuda = str(device).startswith("cuda")
    return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32


def load_tokenizer(model_dir: str | Path, padding_side: str = "left", **from_pretrained_kwargs: Any) -> Any:
    """The model's tokenizer, padded on `padding_side`, with EOS as pad token when it has none.

    Left padding (the default) puts every row's last prompt token in the last column: where
    scoring reads the next-token distribution and where generation continues.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **from_pretrained_kwargs)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    *,
    dtype: Any = None,
    device: str | None = None,
    merge_adapter: bool = True,
    **from_pretrained_kwargs: Any,
) -> Any:
    """A causal LM from a local folder or hub id, plus an optional PEFT adapter, in eval mode.

    `dtype` None leaves transformers' default; `device` None leaves the model where
    from_pretrained put it. With `merge_adapter`, the adapter is merged into the weights when it
    can be; `merge_adapter=False` keeps the PeftModel (to log or save the adapter itself).
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(from_pretrained_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if merge_adapter:
            try:
                # Merged weights score as fast as the base model; adapters that cannot merge
                # (prompt tuning and the like) still work unmerged.
                model = model.merge_and_unload()
            except (AttributeError, NotImplementedError, ValueError):
                pass
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_model_for_eval(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    device: str | None = None,
) -> tuple[Any, Any]:
    """Load a local HF model (plus an optional PEFT adapter, merged) ready for scoring."""
    device = default_device(device)
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_causal_lm(model_dir, adapter_dir, dtype=eval_dtype(device), device=device)
    return model, tokenizer


# --- batching and greedy generation ---------------------------------------------------------


def model_device(model: Any):
    """The device of the model's first parameter (CPU for a model without parameters)."""
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def forward_params(model: Any) -> set[str]:
    """Names of the model's forward arguments (which optional speed-ups it accepts)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return set()
    return set(params)


def encode_context(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a context as the harness encodes it: the tokenizer's own special-token
    handling, except that a text that already starts with BOS (a chat template wrote it) gets none."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def left_padded_batches(encoded: Sequence[list[int]], batch_size: int, pad_id: int) -> Iterator[tuple[list[int], Any, Any]]:
    """Yield (row indices, input_ids, attention_mask) for length-bucketed, left-padded batches.

    Sorting by length keeps padding (wasted compute) small; left padding puts every row's last
    prompt token in the last column, where scoring reads and generation continues.
    """
    import torch

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batch_size = max(1, int(batch_size))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i], dtype=torch.long)
            attention[row, width - len(encoded[i]):] = 1
        yield idx, input_ids, attention


def generate_responses(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[list[dict[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: str | None = None,
) -> list[str]:
    """Greedy completions of each context (rendered with the chat template), in input order."""
    import torch

    texts = [tokenizer.apply_chat_template(turns, chat_template=chat_template, tokenize=False, add_generation_prompt=True)
             for turns in contexts]
    encoded = [encode_context(tokenizer, t) for t in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [i for i in {tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)}
           if isinstance(i, int)]
    device = model_device(model)
    outputs: list[str] = [""] * len(encoded)
    with torch.inference_mode():
        for idx, input_ids, attention in left_padded_batches(encoded, batch_size, pad_id):
            width = input_ids.shape[1]
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=int(max_new_tokens),
                do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                eos_token_id=eos or None,
            )
            for row, i in enumerate(idx):
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return outputs
