"""Tests for sft_pipeline.tokenization.encode: assistant-only labels, EOS/BOS, fast path == reference path."""

from __future__ import annotations

import pytest

from sft_pipeline.tokenization.config import IGNORE_INDEX, TokenizationConfig
from sft_pipeline.tokenization.encode import ConversationEncoder, tokenize_conversation
from sft_pipeline.tokenization.render import normalize_messages, render_with_spans
from sft_pipeline.tokenization.templates import resolve_template
from tests.unit.tokenization.samples import (
    CONTENT_BRANCH,
    CONTENT_DEPENDENT,
    MULTI,
    SINGLE,
    labeled_spans,
    random_conversations,
)


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


def reference_encoding(msgs, tokenizer, template):
    """The original per-conversation algorithm: prefix rendering + offsets, one conversation at a time."""
    from sft_pipeline.tokenization.tokens import _special_prefix

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
