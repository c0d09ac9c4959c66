"""Tests for sft_pipeline.tokenization: assistant-only labels, length policy, splits, Parquet output."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sft_pipeline.schema import make_row
from sft_pipeline.tokenization import (
    IGNORE_INDEX,
    ConversationEncoder,
    SftDatasetInfo,
    TokenizationConfig,
    assign_split,
    build_sft_dataset,
    fingerprint,
    load_sft_splits,
    materialize_sft_dataset,
    normalize_messages,
    pack_bins,
    packed_attention_mask,
    read_sft_dataset_info,
    render_with_spans,
    resolve_template,
    tokenize_conversation,
)
from sft_pipeline import tokenization

SINGLE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
MULTI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short poem about the sea."},
    {"role": "assistant", "content": "The sea is wide and grey and calm."},
    {"role": "user", "content": "List three ideas for a birthday party."},
    {"role": "assistant", "content": "A picnic, a treasure hunt, a movie night."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def labeled_spans(enc):
    """Runs of consecutive labeled token ids."""
    spans, cur = [], []
    for tok_id, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            assert label == tok_id
            cur.append(tok_id)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def test_labels_only_on_assistant_tokens(tokenizer):
    enc = tokenize_conversation(SINGLE, tokenizer, TokenizationConfig())
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"])
    assert set(enc["attention_mask"]) == {1}
    spans = labeled_spans(enc)
    assert [tokenizer.decode(s) for s in spans] == [SINGLE[1]["content"] + tokenizer.eos_token]
    # Everything before the answer (user turn, assistant header) and the trailing newline is masked.
    unlabeled = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == IGNORE_INDEX]
    assert SINGLE[0]["content"] in tokenizer.decode(unlabeled)
    assert enc["labels"][-1] == IGNORE_INDEX and tokenizer.decode(enc["input_ids"][-1:]) == "\n"


def test_every_assistant_turn_is_labeled(tokenizer):
    enc = tokenize_conversation(MULTI, tokenizer, TokenizationConfig())
    decoded = [tokenizer.decode(s) for s in labeled_spans(enc)]
    assert decoded == [MULTI[2]["content"] + "<|im_end|>", MULTI[4]["content"] + "<|im_end|>"]


def test_eos_labeled_when_pad_equals_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.pad_token_id == tok.eos_token_id
    enc = tokenize_conversation(MULTI, tok, TokenizationConfig())
    assert enc["labels"].count(tok.eos_token_id) == 2  # one per assistant turn
    for span in labeled_spans(enc):
        assert span[-1] == tok.eos_token_id


def test_no_doubled_bos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    # A tokenizer that adds a BOS on encode, with a BOS distinct from the template's tokens.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, bos_token="<|endoftext|>", add_bos_token=True)
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    enc = tokenize_conversation(SINGLE, tok, TokenizationConfig(template="chatml"))
    assert enc["input_ids"][0] == tok.bos_token_id and enc["input_ids"].count(tok.bos_token_id) == 1
    assert enc["labels"][0] == IGNORE_INDEX
    # llama2 writes {{ bos_token }} itself: it must not be added a second time.
    enc = tokenize_conversation(SINGLE, tok, TokenizationConfig(template="llama2"))
    assert enc["input_ids"][0] == tok.bos_token_id and enc["input_ids"].count(tok.bos_token_id) == 1


def test_template_without_end_marker_gets_eos(tokenizer, tmp_path):
    plain = tmp_path / "plain.jinja"
    plain.write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
        "{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    enc = tokenize_conversation(SINGLE, tokenizer, TokenizationConfig(template=str(plain)))
    spans = labeled_spans(enc)
    assert len(spans) == 1 and spans[0][-1] == tokenizer.eos_token_id
    # " Paris" is one byte-level token, so the space after "A:" comes along with the content.
    assert tokenizer.decode(spans[0]).strip() == SINGLE[1]["content"] + tokenizer.eos_token


@pytest.mark.parametrize("template", ["tokenizer", "chatml", "alpaca", "llama2", "zephyr"])
def test_shipped_templates_label_assistant_content(tokenizer, template):
    enc = tokenize_conversation(MULTI, tokenizer, TokenizationConfig(template=template))
    decoded = [tokenizer.decode(s) for s in labeled_spans(enc)]
    assert len(decoded) == 2
    for text, msg in zip(decoded, (MULTI[2], MULTI[4])):
        assert msg["content"] in text and text.rstrip().endswith(tokenizer.eos_token)
    assert MULTI[1]["content"] not in "".join(decoded)


def test_system_prompt_prepended_only_when_missing(tokenizer):
    cfg = TokenizationConfig(system_prompt="Be brief.")
    enc = tokenize_conversation(SINGLE, tokenizer, cfg)
    assert tokenizer.decode(enc["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    enc = tokenize_conversation(MULTI, tokenizer, cfg)
    text = tokenizer.decode(enc["input_ids"])
    assert "Be brief." not in text and "You are a helpful assistant." in text


def test_conversation_without_assistant_rejected(tokenizer):
    with pytest.raises(ValueError, match="assistant"):
        tokenize_conversation(SINGLE[:1], tokenizer, TokenizationConfig())


# --- splits ---------------------------------------------------------------------------------------


def test_split_is_deterministic_and_stable():
    ids = [f"row-{i}" for i in range(3000)]
    first = {i: assign_split(i, 0.1, 0.1) for i in ids}
    assert first == {i: assign_split(i, 0.1, 0.1) for i in ids}
    # Adding rows never moves an existing one: the split depends on the id alone.
    more = ids + [f"new-{i}" for i in range(500)]
    assert all(assign_split(i, 0.1, 0.1) == first[i] for i in more[:3000])
    counts = pd.Series(list(first.values())).value_counts(normalize=True)
    assert abs(counts["test"] - 0.1) < 0.03 and abs(counts["validation"] - 0.1) < 0.03
    assert {assign_split(i, 0.0, 0.0) for i in ids} == {"train"}


# --- the dataset ----------------------------------------------------------------------------------


def make_rows(n: int, long_every: int = 0) -> pd.DataFrame:
    rows = []
    for i in range(n):
        answer = f"Answer number {i}: Paris is the capital of France."
        if long_every and i % long_every == 0:
            answer = " ".join(["The sea is wide and grey and calm."] * 40)
        rows.append(make_row([{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}],
                             source="unit"))
    return pd.DataFrame(rows)


def test_build_writes_loadable_parquet(tiny_model_dir, tmp_path):
    rows = make_rows(60)
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds", TokenizationConfig(max_length=256))
    assert isinstance(info, SftDatasetInfo)
    assert sum(info.splits.values()) == 60 and info.splits["train"] > 0
    assert info.dropped == 0 and info.truncated == 0 and info.template_name == "tokenizer"
    assert 0 < info.trainable_tokens < info.num_tokens
    assert sum(info.length_histogram.values()) == 60
    assert read_sft_dataset_info(tmp_path / "ds") == info
    json.dumps(info.to_dict())

    from datasets import load_dataset

    # train and validation share columns and load together; test has `messages` too, so alone.
    ds = load_dataset("parquet", data_files={s: info.files[s] for s in ("train", "validation")})
    ds["test"] = load_dataset("parquet", data_files=info.files["test"], split="train")
    assert {name: len(ds[name]) for name in ds} == info.splits
    train = ds["train"]
    assert set(train.column_names) == {"id", "input_ids", "attention_mask", "labels", "length"}
    assert set(ds["test"].column_names) == set(train.column_names) | {"messages"}
    assert {n: len(d) for n, d in load_sft_splits(tmp_path / "ds").items()} == info.splits
    ex = train[0]
    assert ex["length"] == len(ex["input_ids"]) == len(ex["labels"])
    assert IGNORE_INDEX in ex["labels"] and any(x != IGNORE_INDEX for x in ex["labels"])
    assert set(rows["id"]) == set(ds["train"]["id"]) | set(ds["validation"]["id"]) | set(ds["test"]["id"])
    # Each row lands in the split its id says.
    for name in ds:
        assert all(assign_split(i, 0.1, 0.1) == name for i in ds[name]["id"])


def test_empty_splits_still_load(tiny_model_dir, tmp_path):
    info = build_sft_dataset(make_rows(5), tiny_model_dir, tmp_path / "ds",
                             TokenizationConfig(validation_fraction=0, test_fraction=0))
    assert info.splits == {"train": 5, "validation": 0, "test": 0}
    ds = load_sft_splits(info)
    assert len(ds["validation"]) == 0 and "labels" in ds["validation"].column_names
    assert "messages" in ds["test"].column_names
    assert len(pd.read_parquet(info.files["validation"])) == 0


def test_test_split_keeps_messages(tiny_model_dir, tmp_path):
    rows = make_rows(40)
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds", TokenizationConfig(test_fraction=0.5))
    test = pd.read_parquet(info.files["test"])
    assert len(test) > 0
    by_id = dict(zip(rows["id"], rows["messages"]))
    first = test.iloc[0]
    assert [dict(m) for m in first["messages"]] == by_id[first["id"]]


def test_max_length_drop_vs_truncate(tiny_model_dir, tmp_path):
    rows = make_rows(30, long_every=3)  # 10 long rows
    dropped = build_sft_dataset(rows, tiny_model_dir, tmp_path / "drop", TokenizationConfig(max_length=64))
    assert dropped.dropped == 10 and dropped.truncated == 0
    assert sum(dropped.splits.values()) == 20

    cut = build_sft_dataset(rows, tiny_model_dir, tmp_path / "cut",
                            TokenizationConfig(max_length=64, truncation="truncate"))
    assert cut.dropped == 0 and cut.truncated == 10
    assert sum(cut.splits.values()) == 30
    lengths = pd.concat(pd.read_parquet(f) for f in cut.files.values())["length"]
    assert lengths.max() == 64


def test_truncated_rows_without_labels_are_dropped(tiny_model_dir, tmp_path):
    long_prompt = " ".join(["The sea is wide and grey and calm."] * 40)
    rows = pd.DataFrame([make_row([{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "Yes."}],
                                  source="unit")] + make_rows(5).to_dict("records"))
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds",
                             TokenizationConfig(max_length=64, truncation="truncate", validation_fraction=0,
                                                test_fraction=0))
    assert info.dropped == 1 and info.splits["train"] == 5


def test_empty_train_raises(tiny_model_dir, tmp_path):
    rows = make_rows(3, long_every=1)  # every row too long
    with pytest.raises(ValueError, match="train split would be empty"):
        build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds", TokenizationConfig(max_length=32))
    assert not (tmp_path / "ds").exists()


def test_rebuild_replaces_output(tiny_model_dir, tmp_path):
    out = tmp_path / "ds"
    build_sft_dataset(make_rows(20), tiny_model_dir, out, TokenizationConfig())
    info = build_sft_dataset(make_rows(10), tiny_model_dir, out, TokenizationConfig())
    assert sum(info.splits.values()) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_fingerprint(tiny_model_dir):
    ids = list(make_rows(10)["id"])
    cfg = TokenizationConfig()
    fp = fingerprint(ids, tiny_model_dir, cfg)
    assert fp == fingerprint(list(reversed(ids)), tiny_model_dir, TokenizationConfig())
    assert fp != fingerprint(ids[:-1], tiny_model_dir, cfg)
    assert fp != fingerprint(ids, tiny_model_dir, TokenizationConfig(max_length=512))
    assert fp != fingerprint(ids, tiny_model_dir, TokenizationConfig(template="alpaca"))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_length": 0}, "max_length"),
        ({"max_length": "1024"}, "max_length"),
        ({"truncation": "clip"}, "truncation"),
        ({"validation_fraction": -0.1}, "validation_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "validation_fraction"),
        ({"template": "nonsense"}, "template"),
        ({"template": "/no/such/template.jinja"}, "template"),
        ({"system_prompt": 3}, "system_prompt"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TokenizationConfig(**kwargs)


@pytest.mark.parametrize("template", ["tokenizer", "plain"])
def test_empty_answer_trains_only_the_end(tokenizer, tmp_path, template):
    if template == "plain":
        template = str(tmp_path / "plain.jinja")
        (tmp_path / "plain.jinja").write_text(
            "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
            "{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}"
        )
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Paris"}]
    enc = tokenize_conversation(msgs, tokenizer, TokenizationConfig(template=template))
    spans = [tokenizer.decode(s).strip() for s in labeled_spans(enc)]
    assert spans == [tokenizer.eos_token, "Paris" + tokenizer.eos_token]


# --- fast path == reference path -------------------------------------------------------------------


def random_conversations(n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    words = ["Paris", "sea", "  spaced ", "\n\nnew", "émoji 😀", "code:\n    x = 1", "tab\t", "end.", "calm"]
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": " ".join(rng.choices(words, k=3))}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 5)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(0, 6)))})
        out.append(msgs)
    return out


def reference_encoding(msgs, tokenizer, template):
    """The original per-conversation algorithm: prefix rendering + offsets, one conversation at a time."""
    from sft_pipeline.tokenization import _special_prefix

    full, spans = render_with_spans(normalize_messages(msgs), tokenizer, template)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels, inserts = [IGNORE_INDEX] * len(ids), []
    for start, end, needs_eos in spans:
        last = None
        for k, (a, b) in enumerate(offsets):
            if b > a and a < end and b > start:
                labels[k], last = ids[k], k
        if needs_eos:
            if last is None:
                last = next((k for k, (a, _) in enumerate(offsets) if a >= start), len(ids)) - 1
            inserts.append(last + 1)
    for k in sorted(inserts, reverse=True):
        ids.insert(k, tokenizer.eos_token_id)
        labels.insert(k, tokenizer.eos_token_id)
    prefix = _special_prefix(tokenizer)
    if prefix and ids[: len(prefix)] != prefix:
        ids, labels = prefix + ids, [IGNORE_INDEX] * len(prefix) + labels
    return ids, labels


CONTENT_DEPENDENT = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if 'Paris' in m['content'] %}[city] {% endif %}"
    "{{ m['content'] | trim }}{{ '<|im_end|>\n' }}{% endfor %}"
)


# Branches on the content without changing it: the skeleton builds, the proof fails, rows are rendered.
CONTENT_BRANCH = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if 'Paris' in m['content'] %}[city] {% endif %}"
    "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
)


@pytest.mark.parametrize("template", ["tokenizer", "alpaca", "llama2", "zephyr", "content_dependent", "content_branch",
                                      "plain"])
def test_fast_path_matches_reference(tokenizer, tmp_path, template):
    if template in ("content_dependent", "content_branch"):
        (tmp_path / "t.jinja").write_text(CONTENT_DEPENDENT if template == "content_dependent" else CONTENT_BRANCH)
        template = str(tmp_path / "t.jinja")
    elif template == "plain":
        (tmp_path / "t.jinja").write_text(
            "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
            "{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
        )
        template = str(tmp_path / "t.jinja")
    text, _ = resolve_template(tokenizer, template)
    convs = random_conversations(120)
    batch = ConversationEncoder(tokenizer, text).encode(convs)
    assert batch.fast_rows > 0 or template.endswith("t.jinja")
    for msgs, row in zip(convs, batch.rows()):
        ids, labels = reference_encoding(msgs, tokenizer, text)
        assert row["input_ids"] == ids and row["labels"] == labels


@pytest.mark.parametrize("template, verbatim", [
    ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] ~ '<|im_end|>\n' }}{% endfor %}", True),
    ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
     "{% else %}{{ m.content }}{% endif %}{% if loop.last and messages|length > 1 %}.{% endif %}{% endfor %}", True),
    ("{% if messages and messages[0]['role'] == 'system' %}{% set turns = messages[1:] %}{% else %}"
     "{% set turns = messages %}{% endif %}{% for m in turns %}{{ m['content'] }}{% endfor %}", True),
    (CONTENT_DEPENDENT, False),
    (CONTENT_BRANCH, False),
    ("{% for m in messages %}{% set c = m['content'] %}{{ c }}{% endfor %}", False),
    ("{% for m in messages %}{% filter upper %}{{ m['content'] }}{% endfilter %}{% endfor %}", False),
    ("{% for m in messages %}{% set b %}{{ m['content'] }}{% endset %}{{ b }}{% endfor %}", False),
    ("{{ messages | tojson }}", False),
    ("{% for m in messages %}{{ m }}{% endfor %}", False),
    ("{% for m in messages %}{% for k, v in m.items() %}{{ v }}{% endfor %}{% endfor %}", False),
    ("{% for m in messages %}{{ m['content'] }}{% if loop.nextitem['content'] %}!{% endif %}{% endfor %}", False),
    ("{% set ns = namespace(m=none) %}{% for m in messages %}{% set ns.m = m %}{% endfor %}{{ ns.m.content }}", False),
    ("{% for m in messages %}{{ m['content'] if m['role'] == 'user' else m['content'][:3] }}{% endfor %}", False),
    ("{% macro r(x) %}{{ x }}{% endmacro %}{% for m in messages %}{{ r(m['content']) }}{% endfor %}", False),
    ("{% for m in messages %}{{ (m['content'] + '.') | length }}{% endfor %}", False),
    # Found by review: the loop object reached other ways than loop.previtem / loop.nextitem ...
    ("{% for m in messages %}{{ m.content }}{% if loop['nextitem'] %}{{ loop['nextitem'].content|length }}{% endif %}"
     "{% endfor %}", False),
    ("{% for m in messages %}{% set l = loop %}{{ m.content }}{{ l.nextitem.content|length }}{% endfor %}", False),
    ("{% for m in messages recursive %}{{ m.content }}{% endfor %}", False),
    # ... and one name bound to the list and to a message, so x['content'] looked like a message.
    ("{% set x = messages %}{% set x = x[0] %}{% if x['content'] %}!{% endif %}", False),
    ("{% for m in messages %}{% set messages = m %}{{ messages['content']['split']()|length }}{% endfor %}", False),
    ("{% for m in messages %}{{ m.content }}{% if m.tool_calls %}!{% endif %}{% endfor %}", False),
    ("{% set messages = messages[1:] %}{% for m in messages %}{{ m.content }}{% if loop.last %}.{% endif %}{% endfor %}",
     True),
])
def test_verbatim_proof(template, verbatim):
    assert tokenization.template_writes_content_verbatim(template) is verbatim


def test_shipped_templates_are_proved_verbatim(tokenizer):
    texts = [resolve_template(tokenizer, name)[0] for name in ["tokenizer"] + tokenization.shipped_templates()]
    assert all(tokenization.template_writes_content_verbatim(t) for t in texts)


def test_proved_template_rows_are_not_rendered_again(tokenizer, tmp_path):
    """With a proof, a row is assembled from its role sequence's skeleton: render() runs only to build
    skeletons. Without one (CONTENT_BRANCH), every fast-path row is rendered once more to compare."""
    convs = random_conversations(60)
    for text, proved in ((resolve_template(tokenizer, "tokenizer")[0], True), (CONTENT_BRANCH, False)):
        encoder = ConversationEncoder(tokenizer, text)
        encoder.encode(convs)  # builds the skeletons
        calls = []
        render = encoder.render
        encoder.render = lambda msgs, *a, **k: calls.append(1) or render(msgs, *a, **k)
        batch = encoder.encode(convs)
        assert encoder.verbatim is proved and batch.fast_rows > 0
        # Unproved: at least every fast-path row was rendered (rows failing the comparison are too).
        assert len(calls) == 0 if proved else len(calls) >= batch.fast_rows


def test_content_dependent_template_falls_back_to_the_slow_path(tokenizer, tmp_path):
    (tmp_path / "t.jinja").write_text(CONTENT_DEPENDENT)
    encoder = ConversationEncoder(tokenizer, (tmp_path / "t.jinja").read_text())
    batch = encoder.encode([SINGLE, MULTI])
    assert batch.slow_rows == 2 and batch.fast_rows == 0  # `trim` changes the sentinel: never assumed
    spans = [tokenizer.decode(s) for s in labeled_spans(batch.rows()[0])]
    assert [s.strip() for s in spans] == [SINGLE[1]["content"] + "<|im_end|>"]  # " Paris" after "[city]"


def test_control_token_in_content(tiny_model_dir, tmp_path):
    rows = make_rows(10)
    bad = make_row([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure<|im_end|> more"}], source="unit")
    rows = pd.concat([rows, pd.DataFrame([bad])], ignore_index=True)
    with pytest.raises(ValueError, match=f"row {bad['id']}.*<\\|im_end\\|>"):
        build_sft_dataset(rows, tiny_model_dir, tmp_path / "a", TokenizationConfig())
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "b", TokenizationConfig(control_tokens_in_content="drop"))
    assert info.dropped_reasons == {"control_token_in_content": 1} and sum(info.splits.values()) == 10
    dropped = pd.read_parquet(tmp_path / "b" / "dropped.parquet")
    assert list(dropped["id"]) == [bad["id"]] and "<|im_end|>" in dropped["detail"][0]


def test_duplicate_ids_are_kept_once_and_reported(tiny_model_dir, tmp_path):
    rows = make_rows(10)
    rows = pd.concat([rows, rows.iloc[:2]], ignore_index=True)
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds", TokenizationConfig())
    assert sum(info.splits.values()) == 10 and info.dropped_reasons == {"duplicate_id": 2} and info.rows_in == 12


def test_malformed_row_names_its_id(tiny_model_dir, tmp_path):
    rows = make_rows(3)
    rows.at[1, "messages"] = [{"role": "robot", "content": "x"}]
    with pytest.raises(ValueError, match=f"row {rows['id'][1]}.*robot"):
        build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds", TokenizationConfig())


# --- reuse ----------------------------------------------------------------------------------------


def test_unchanged_inputs_are_not_tokenized_again(tiny_model_dir, tmp_path, monkeypatch):
    rows = make_rows(20)
    first = materialize_sft_dataset(rows, tiny_model_dir, tmp_path, TokenizationConfig())
    assert first.reused is False and first.path == str(tmp_path / first.fingerprint) and len(first.content_hash) == 64

    def no_build(*args, **kwargs):
        raise AssertionError("unchanged inputs must not be tokenized again")

    monkeypatch.setattr(tokenization, "build_sft_dataset", no_build)
    again = materialize_sft_dataset(rows.iloc[::-1], tiny_model_dir, tmp_path, TokenizationConfig(num_workers=2))
    assert again.reused is True and again.content_hash == first.content_hash and again.splits == first.splits
    monkeypatch.undo()

    edited = rows.copy()  # same id, different text: a stale cache would hide this
    edited.at[0, "messages"] = [{"role": "user", "content": "Changed?"}, {"role": "assistant", "content": "Yes."}]
    assert fingerprint(edited, tiny_model_dir) != fingerprint(rows, tiny_model_dir)
    for cfg in (TokenizationConfig(max_length=512), TokenizationConfig(template="chatml"),
                TokenizationConfig(system_prompt="Be brief."), TokenizationConfig(packing=True)):
        assert fingerprint(rows, tiny_model_dir, cfg) != first.fingerprint
    assert fingerprint(rows, tiny_model_dir, TokenizationConfig(batch_size=7)) == first.fingerprint


def test_workers_and_batches_do_not_change_the_output(tiny_model_dir, tmp_path):
    rows = make_rows(40, long_every=7)
    cfg = dict(max_length=64, truncation="truncate")
    one = build_sft_dataset(rows, tiny_model_dir, tmp_path / "one", TokenizationConfig(**cfg))
    many = build_sft_dataset(rows, tiny_model_dir, tmp_path / "many", TokenizationConfig(num_workers=2, batch_size=9, **cfg))
    assert one.content_hash == many.content_hash and one.splits == many.splits and one.truncated == many.truncated


def test_content_hash_is_the_written_rows(tiny_model_dir, tmp_path):
    """The hash taken while writing equals the hash of the files read back; it ignores batching but
    not a changed value."""
    import pyarrow as pa

    info = build_sft_dataset(make_rows(30), tiny_model_dir, tmp_path / "ds", TokenizationConfig(packing=True))
    names = [f"{s}.parquet" for s in ("train", "validation", "test")] + ["train.packed.parquet", "validation.packed.parquet"]
    read_back = {name: tokenization.parquet_digest(tmp_path / "ds" / name) for name in names}
    assert tokenization.combine_digests(read_back) == info.content_hash
    assert info.template_verbatim is True  # the tiny tokenizer's ChatML template is proved verbatim

    table = pa.table({"id": ["a", "b", "c"], "ids": pa.array([[1, 2], [3], []], type=pa.list_(pa.int32()))})
    whole, pieces, changed = tokenization.TableHasher(), tokenization.TableHasher(), tokenization.TableHasher()
    whole.update(table)
    pieces.update(table.slice(0, 1))
    pieces.update(table.slice(1))
    changed.update(pa.table({"id": ["a", "b", "c"], "ids": pa.array([[1], [2, 3], []], type=pa.list_(pa.int32()))}))
    assert whole.hexdigest() == pieces.hexdigest() != changed.hexdigest()


# --- packing --------------------------------------------------------------------------------------


def test_pack_bins():
    lengths = [5, 5, 3, 7, 2, 8, 10]
    bins = pack_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 40 tokens in bins of 10: the optimum
    with pytest.raises(ValueError, match="pack_length"):
        pack_bins([11], 10)


def test_packed_split_isolates_examples(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    rows = make_rows(30)
    info = build_sft_dataset(rows, tiny_model_dir, tmp_path / "ds",
                             TokenizationConfig(packing=True, pack_length=128, validation_fraction=0, test_fraction=0))
    assert set(info.packed_files) == {"train", "validation"}
    packed = pd.read_parquet(info.packed_files["train"])
    plain = pd.read_parquet(info.files["train"]).set_index("id")
    assert info.packed_sequences["train"] == len(packed) < len(plain)
    assert (packed["length"] == 128).all() and all(len(x) == 128 for x in packed["input_ids"])
    assert sorted(i for ids in packed["example_ids"] for i in ids) == sorted(plain.index)
    # The unpacked files keep their schema.
    assert list(pd.read_parquet(info.files["train"]).columns) == ["id", "input_ids", "attention_mask", "labels", "length"]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pack = packed.iloc[0]
    assert len(pack["example_ids"]) >= 2
    with torch.no_grad():
        # position_ids restart per example and the block-diagonal mask: examples do not see each other.
        mask = packed_attention_mask(pack["example_lengths"], 128)
        logits = model(input_ids=torch.tensor([list(pack["input_ids"])]), attention_mask=mask,
                       position_ids=torch.tensor([list(pack["position_ids"])])).logits[0]
        start = 0
        for row_id, n in zip(pack["example_ids"], pack["example_lengths"]):
            row = plain.loc[row_id]
            assert list(pack["input_ids"][start:start + n]) == list(row["input_ids"])
            assert list(pack["position_ids"][start:start + n]) == list(range(n))
            assert pack["labels"][start] == IGNORE_INDEX
            assert list(pack["labels"][start + 1:start + n]) == list(row["labels"][1:])
            alone = model(input_ids=torch.tensor([list(row["input_ids"])])).logits[0]
            torch.testing.assert_close(logits[start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n
        assert set(pack["attention_mask"][start:]) <= {0} and set(pack["labels"][start:]) <= {IGNORE_INDEX}
    assert 0 < info.packing_efficiency <= 1


def test_bulk_allocation_restores_gc_and_heap_settings():
    import gc
    import platform

    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert tokenization._set_heap_trim_threshold(tokenization._GLIBC_DEFAULT_TRIM_THRESHOLD) is on_glibc
    assert gc.get_freeze_count() == 0
    with tokenization.bulk_allocation():
        assert gc.get_freeze_count() > 0 and gc.isenabled()
        kept = [bytearray(1 << 20) for _ in range(8)]  # allocations inside the block work as usual
    assert gc.get_freeze_count() == 0 and sum(len(b) for b in kept) == 8 << 20
    with pytest.raises(RuntimeError), tokenization.bulk_allocation():
        raise RuntimeError("a failing batch")
    assert gc.get_freeze_count() == 0
