"""The curation stage: `clean_instructions` runs normalization, filters, decontamination and dedup over a table."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

from sft_pipeline.curation.config import CurationConfig
from sft_pipeline.curation.decontamination import find_contaminated
from sft_pipeline.curation.dedup import dedup_key, lsh_params, near_duplicates
from sft_pipeline.curation.filters import PhraseFilter, conversation_problem, phrase_problem
from sft_pipeline.curation.normalize import normalize_text
from sft_pipeline.curation.pii import find_pii, redact_pii
from sft_pipeline.curation.tokens import TokenCounter
from sft_pipeline.ingest.frames import rejects_frame, rows_frame
from sft_pipeline.schema import conversation_id, flatten_turns, make_reject

log = logging.getLogger(__name__)


@dataclass
class CurationReport:
    """What `clean_instructions` did: counts in, kept, rejected per reason, redactions, timings."""

    rows_in: int
    kept: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    redactions: dict[str, int] = field(default_factory=dict)
    token_counter: str = "approx"
    kept_tokens: list[int] = field(default_factory=list)
    seconds_per_phase: dict[str, float] = field(default_factory=dict)
    lsh_bands: tuple[int, int] = (0, 0)
    near_dedup_candidates: int = 0


def _plain_messages(turns: Any) -> list[dict[str, str]]:
    if hasattr(turns, "tolist"):  # numpy arrays out of Parquet
        turns = turns.tolist()
    return [{"role": m["role"], "content": m["content"]} for m in turns]


def _conversation_text(messages: list[dict[str, str]], with_roles: bool) -> str:
    if with_roles:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return "\n".join(m["content"] for m in messages)


def clean_instructions(
    rows: pd.DataFrame,
    cfg: CurationConfig | None = None,
    benchmark_texts: Iterable[tuple[str, str]] = (),
) -> tuple[pd.DataFrame, pd.DataFrame, CurationReport]:
    """Normalize, filter, decontaminate and deduplicate canonical rows.

    `benchmark_texts` are (item id, text) pairs: a question with its choices. Returns
    (kept rows, rejected rows, report); len(kept) + len(rejected) == len(rows). Kept rows keep
    every input column (provenance included) with normalized `messages` and fresh `id`,
    `prompt` and `response`; rejected rows are ordered by input position.
    """
    cfg = cfg or CurationConfig()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    n_rows = len(rows)
    rejected: list[tuple[int, dict[str, Any]]] = []
    refusals = PhraseFilter(cfg.refusal_patterns if cfg.filter_refusals else [])
    boilerplate = PhraseFilter(cfg.boilerplate_patterns if cfg.filter_boilerplate else [])
    redactions = {"email": 0, "phone": 0}

    messages_col = rows["messages"].tolist() if n_rows else []
    ids_col = rows["id"].tolist() if n_rows else []
    where_cols = [rows[c].tolist() if c in rows else [None] * n_rows for c in ("source", "source_file", "source_index")]

    def reject(position: int, reason: str, detail: str, raw: Any, row_id: Any) -> None:
        source, source_file, source_index = (col[position] for col in where_cols)
        if source_index is not None and pd.isna(source_index):
            source_index = None
        rejected.append(
            (position, make_reject(stage="curation", reason=reason, detail=detail, raw=raw, id=row_id,
                                   source=source, source_file=source_file, source_index=source_index))
        )

    def raw_text(raw_messages: list[dict[str, str]]) -> list[dict[str, str]]:
        # A rejected row keeps its raw text for review, not the personal data the kept rows lose.
        if cfg.pii == "keep":
            return raw_messages
        return [{"role": m["role"], "content": redact_pii(m["content"] or "")[0]} for m in raw_messages]

    # Phase 1: per-row normalization, PII, structure, character bounds, phrases.
    alive: list[int] = []
    normalized: dict[int, list[dict[str, str]]] = {}
    for position in range(n_rows):
        raw_messages = _plain_messages(messages_col[position])
        messages = [{"role": m["role"], "content": normalize_text(m["content"] or "", cfg.strip_html)} for m in raw_messages]
        if cfg.pii != "keep":
            if cfg.pii == "reject":
                found: dict[str, int] = {}
                for m in messages:
                    for kind, count in find_pii(m["content"]).items():
                        found[kind] = found.get(kind, 0) + count
                if found:
                    what = ", ".join(f"{count} {kind}" for kind, count in sorted(found.items()))
                    reject(position, "pii", f"holds personal data: {what}", raw_text(raw_messages), ids_col[position])
                    continue
            else:
                for m in messages:
                    m["content"], counts = redact_pii(m["content"])
                    for kind, count in counts.items():
                        redactions[kind] += count
        problem = conversation_problem(messages, cfg) or phrase_problem(messages, refusals, boilerplate)
        if problem:
            reject(position, problem[0], problem[1], raw_text(raw_messages), ids_col[position])
            continue
        alive.append(position)
        normalized[position] = messages
    timings["normalize_filter"] = time.perf_counter() - clock

    # Phase 2: token bounds.
    clock = time.perf_counter()
    counter = TokenCounter(cfg.tokenizer)
    token_counts = counter.count([_conversation_text(normalized[p], with_roles=False) for p in alive])
    tokens_of: dict[int, int] = {}
    survivors = []
    for position, count in zip(alive, token_counts.tolist()):
        if cfg.max_conversation_tokens and count > cfg.max_conversation_tokens:
            reject(position, "too_many_tokens", f"the conversation has {count} tokens ({counter.name}), more than {cfg.max_conversation_tokens}", normalized.pop(position), ids_col[position])
        elif count < cfg.min_conversation_tokens:
            reject(position, "too_few_tokens", f"the conversation has {count} tokens ({counter.name}), fewer than {cfg.min_conversation_tokens}", normalized.pop(position), ids_col[position])
        else:
            survivors.append(position)
            tokens_of[position] = count
    alive = survivors
    timings["token_bounds"] = time.perf_counter() - clock

    # Phase 3: decontamination.
    clock = time.perf_counter()
    new_id = {p: conversation_id(normalized[p]) for p in alive}
    if cfg.decontamination_ngram:
        texts = [_conversation_text(normalized[p], with_roles=False) for p in alive]
        hits = find_contaminated(texts, list(benchmark_texts), cfg.decontamination_ngram, cfg.chunk_rows)
        for i, (item, gram) in sorted(hits.items()):
            position = alive[i]
            detail = f"shares the {cfg.decontamination_ngram}-gram {gram!r} with benchmark item {item}"
            reject(position, "benchmark_contamination", detail, normalized.pop(position), new_id[position])
        alive = [p for p in alive if p in normalized]
    timings["decontamination"] = time.perf_counter() - clock

    # Phase 4: exact duplicates (first in input order survives).
    clock = time.perf_counter()
    if cfg.exact_dedup:
        first_by_key: dict[str, int] = {}
        survivors = []
        for position in alive:
            key = dedup_key(normalized[position])
            first = first_by_key.setdefault(key, position)
            if first != position:
                detail = f"exact duplicate of {new_id[first]} (source {where_cols[0][first]!r}, index {where_cols[2][first]})"
                reject(position, "exact_duplicate", detail, normalized.pop(position), new_id[position])
            else:
                survivors.append(position)
        alive = survivors
    timings["exact_dedup"] = time.perf_counter() - clock

    # Phase 5: near duplicates over the whole conversation, roles included.
    clock = time.perf_counter()
    bands = (0, 0)
    candidates = 0
    if cfg.near_dedup and len(alive) > 1:
        bands = lsh_params(cfg.near_dedup_threshold, cfg.num_perm, cfg.lsh_recall_at_threshold)
        texts = [_conversation_text(normalized[p], with_roles=True) for p in alive]
        near, candidates = near_duplicates(texts, cfg)
        del texts
        for i, (j, similarity) in sorted(near.items()):
            position, survivor = alive[i], alive[j]
            detail = (f"near duplicate of {new_id[survivor]} (source {where_cols[0][survivor]!r}, index {where_cols[2][survivor]}): "
                      f"shingle Jaccard {similarity:.3f} >= {cfg.near_dedup_threshold}")
            reject(position, "near_duplicate", detail, normalized.pop(position), new_id[position])
        alive = [p for p in alive if p in normalized]
    timings["near_dedup"] = time.perf_counter() - clock

    # Assemble: kept rows keep every input column; messages, id, prompt and response are rebuilt.
    clock = time.perf_counter()
    if alive:
        kept = rows.iloc[alive].reset_index(drop=True).copy()
        kept_messages = [normalized[p] for p in alive]
        kept["messages"] = kept_messages
        kept["id"] = [new_id[p] for p in alive]
        kept["prompt"] = [flatten_turns(m, "user") for m in kept_messages]
        kept["response"] = [flatten_turns(m, "assistant") for m in kept_messages]
        if "origin" in kept:
            kept["origin"] = kept["origin"].fillna("human")
        kept = rows_frame(kept)
    else:
        kept = rows_frame([])
    rejected.sort(key=lambda item: item[0])
    rejected_frame = rejects_frame([r for _, r in rejected])
    timings["assemble"] = time.perf_counter() - clock
    report = CurationReport(
        rows_in=n_rows,
        kept=len(kept),
        rejected_by_reason=rejected_frame["reason"].value_counts().to_dict() if len(rejected_frame) else {},
        redactions={k: v for k, v in redactions.items() if v},
        token_counter=counter.name,
        kept_tokens=[tokens_of[p] for p in alive],
        seconds_per_phase={k: round(v, 3) for k, v in timings.items()},
        lsh_bands=bands,
        near_dedup_candidates=candidates,
    )
    assert len(kept) + len(rejected_frame) == n_rows, "curation lost rows"
    return kept, rejected_frame, report
