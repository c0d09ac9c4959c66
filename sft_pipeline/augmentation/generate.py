"""The Self-Instruct generation loop: rounds of teacher calls and filters, journaled, replayed on resume.

The loop follows Self-Instruct (Wang et al. 2022) as used for Stanford Alpaca:

1. each instruction prompt shows k tasks sampled from the pool (mostly human seeds, a few earlier
   synthetic ones) and asks the teacher for new tasks;
2. every new instruction goes through the filters (parse, length, keyword blacklist, duplicates,
   benchmark overlap, ROUGE-L novelty against the whole pool through a candidate index);
3. the teacher writes an instance for each survivor: classification tasks output-first (a class
   label, then an input of that class), the others input-first (an input when the task needs one,
   then the output);
4. the instance goes through the response filters (empty / non-answer, benchmark overlap).

Each discarded candidate becomes a reject row with a reason. Every round is appended to a journal
keyed by (seed data, teacher, config), so an interrupted run resumes without regenerating what it
already has, and rematerializing with unchanged inputs reuses earlier generations.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from sft_pipeline import schema
from sft_pipeline.augmentation.config import SelfInstructConfig
from sft_pipeline.augmentation.filters import (
    FILTERS,
    REASONS,
    BenchmarkOverlap,
    blacklisted_keyword,
    instruction_word_count,
    response_problem,
)
from sft_pipeline.augmentation.journal import GenerationJournal, generation_key, seed_data_version
from sft_pipeline.augmentation.novelty import NoveltyFilter
from sft_pipeline.augmentation.parsing import normalize, parse_input, parse_instructions, parse_output_first
from sft_pipeline.augmentation.prompts import (
    PROMPT_VERSION,
    build_input_prompt,
    build_instruction_prompt,
    build_output_first_prompt,
    build_response_prompt,
    is_classification_task,
    one_line,
)
from sft_pipeline.augmentation.seeds import sample_examples, seed_pool
from sft_pipeline.augmentation.teachers import Teacher, teacher_fingerprint

SOURCE = "self_instruct"
STAGE = "augmentation"

_ROW_EXTRA = (
    "teacher", "seed_ids", "generation_params", "rouge_l_max", "filter_scores", "instruction", "input", "instance_order",
)


def _empty_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    return (
        pd.DataFrame(columns=list(schema.ROW_COLUMNS) + list(_ROW_EXTRA)),
        pd.DataFrame(columns=list(schema.REJECT_COLUMNS)),
    )


class _State:
    """What the loop has decided so far; rebuilt from the journal on resume."""

    def __init__(self, seeds: list[tuple[str, str]], pool_texts: list[str], cfg: SelfInstructConfig) -> None:
        self.seeds = seeds
        self.novelty = NoveltyFilter(pool_texts, threshold=cfg.rouge_threshold)
        self.seen = {normalize(t) for t in pool_texts}
        self.synthetic: list[tuple[str, str]] = []  # (id, instruction) of accepted rows, sampled back as examples
        self.rows: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self.reasons: Counter = Counter()
        self.checked: Counter = Counter()  # filter -> candidates that reached it
        self.attempts = 0
        self.candidates = 0
        self.rounds = 0

    def apply(self, record: dict[str, Any], live: bool) -> None:
        """Fold one finished round into the state (a live round already added its pool entries)."""
        if not live:
            for instruction in record["pool_added"]:
                self.seen.add(normalize(instruction))
                self.novelty.add(instruction)
        for row in record["rows"]:
            self.rows.append(row)
            self.synthetic.append((row["id"], row["instruction"]))
        for rej in record["rejects"]:
            self.rejects.append(rej)
            self.reasons[rej["reason"]] += 1
        self.checked.update(record["checked"])
        self.attempts += record["calls"]
        self.candidates += record["candidates"]
        self.rounds += 1


def _run_round(
    round_index: int, state: _State, teacher: Teacher, cfg: SelfInstructConfig, bench: BenchmarkOverlap,
) -> dict[str, Any]:
    """Generate and filter one round; returns its journal record. Adds accepted instructions to the pool."""
    # One RNG per round, derived from (seed, round): a resumed run draws exactly what an uninterrupted one would.
    rng = random.Random(f"self-instruct:{cfg.seed}:{round_index}")
    k = cfg.seed_tasks_per_prompt
    pool_added: list[str] = []
    rejects: list[dict[str, Any]] = []
    checked: Counter = Counter()
    rows: list[dict[str, Any]] = []
    calls = 0
    candidate_index = state.candidates

    def reject(index: int, reason: str, detail: str, raw: Any, id: str | None = None) -> None:
        rejects.append(schema.make_reject(
            source=SOURCE, stage=STAGE, reason=reason, detail=detail, raw=raw, source_index=index, id=id,
        ))

    # 1. New instructions from k sampled pool tasks per prompt.
    examples = [
        sample_examples(rng, state.seeds, state.synthetic, k, cfg.synthetic_tasks_per_prompt) for _ in range(cfg.batch_size)
    ]
    prompts = [build_instruction_prompt([t for _, t in ex], cfg.new_tasks_per_prompt) for ex in examples]
    instruction_seed = rng.randrange(2**31)
    instance_seed = rng.randrange(2**31)
    response_seed = rng.randrange(2**31)
    calls += 1
    replies = teacher.generate(prompts, cfg.max_new_tokens_instruction, cfg.temperature, cfg.top_p, instruction_seed)

    pending: list[dict[str, Any]] = []
    for ex, reply in zip(examples, replies):
        parsed = parse_instructions(reply, limit=cfg.new_tasks_per_prompt) or [""]
        for instruction in parsed:
            index = candidate_index
            candidate_index += 1
            raw = reply if len(parsed) == 1 else {"reply": reply, "instruction": instruction}
            checked["parse"] += 1
            if not instruction:
                reject(index, "empty_instruction", "teacher reply has no instruction line", raw)
                continue
            n_words = instruction_word_count(instruction)
            checked["length"] += 1
            if n_words < cfg.min_instruction_words:
                reject(index, "too_short", f"instruction has {n_words} words (< {cfg.min_instruction_words})", raw)
                continue
            if n_words > cfg.max_instruction_words:
                reject(index, "too_long", f"instruction has {n_words} words (> {cfg.max_instruction_words})", raw)
                continue
            checked["blacklist"] += 1
            kw = blacklisted_keyword(instruction)
            if kw:
                reject(index, "blacklisted_keyword", f"instruction mentions '{kw}', which a text model cannot do", raw)
                continue
            checked["duplicate"] += 1
            if normalize(instruction) in state.seen:
                reject(index, "exact_duplicate", "instruction is already in the pool", raw)
                continue
            checked["benchmark_overlap"] += 1
            overlap = bench.check(instruction)
            if overlap:
                reject(index, "benchmark_overlap", f"instruction {overlap}", raw)
                continue
            checked["rouge_l_novelty"] += 1
            novel, score, match = state.novelty.is_novel(instruction)
            if not novel:
                reject(
                    index, "too_similar",
                    f"ROUGE-L {score:.2f} > {cfg.rouge_threshold:.2f} vs pool instruction '{one_line(match or '', 120)}'",
                    raw,
                )
                continue
            # Join the pool now so later candidates (this round's too) are compared with it; it stays in
            # the pool even if its instance fails below, so the teacher's repeats of it are still caught.
            state.seen.add(normalize(instruction))
            state.novelty.add(instruction)
            pool_added.append(instruction)
            pending.append({
                "index": index, "instruction": instruction, "rouge": score, "nearest": match,
                "seed_ids": [i for i, _ in ex], "classification": is_classification_task(instruction),
            })

    # 2. Instances: classification tasks output-first (label, then input), the others input-first.
    step2: list[tuple[dict[str, Any], list[dict[str, str]]]] = []
    for cand in pending:
        if cand["classification"]:
            step2.append((cand, build_output_first_prompt(cand["instruction"])))
        elif cfg.generate_inputs:
            step2.append((cand, build_input_prompt(cand["instruction"])))
        else:
            # No input step: the direct answer rides in the same call as the classification instances.
            step2.append((cand, build_response_prompt(cand["instruction"])))
    outputs: list[str] = []
    if step2:
        calls += 1
        max_tokens = cfg.max_new_tokens_instance if cfg.generate_inputs else max(cfg.max_new_tokens_instance, cfg.max_new_tokens_response)
        outputs = teacher.generate([p for _, p in step2], max_tokens, cfg.temperature, cfg.top_p, instance_seed)
    answer_later: list[dict[str, Any]] = []
    ready: list[dict[str, Any]] = []
    for (cand, _), out in zip(step2, outputs):
        if cand["classification"]:
            checked["instance_format"] += 1
            parsed_instance = parse_output_first(out)
            if parsed_instance is None:
                reject(cand["index"], "malformed_instance", "output-first reply has no 'Class label:' line",
                       {"instruction": cand["instruction"], "reply": out})
                continue
            cand.update(order="output_first", input=parsed_instance[1], response=parsed_instance[0],
                        instance_seed=instance_seed, response_seed=None)
            ready.append(cand)
        elif cfg.generate_inputs:
            cand.update(order="input_first", input=parse_input(out), instance_seed=instance_seed, response_seed=response_seed)
            answer_later.append(cand)
        else:
            cand.update(order="no_input", input="", response=str(out).strip(), instance_seed=None, response_seed=instance_seed)
            ready.append(cand)

    # 3. Outputs of input-first instances, written from the instruction and its input.
    if answer_later:
        calls += 1
        answers = teacher.generate(
            [build_response_prompt(c["instruction"], c["input"]) for c in answer_later],
            cfg.max_new_tokens_response, cfg.temperature, cfg.top_p, response_seed,
        )
        for cand, answer in zip(answer_later, answers):
            cand["response"] = str(answer).strip()
            ready.append(cand)
    ready.sort(key=lambda c: c["index"])

    for cand in ready:
        response = cand["response"]
        user = f"{cand['instruction']}\n\n{cand['input']}" if cand["input"] else cand["instruction"]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
        cid = schema.conversation_id(messages)
        raw = {"instruction": cand["instruction"], "input": cand["input"], "response": response, "seed_ids": cand["seed_ids"]}
        checked["response"] += 1
        problem = response_problem(cand["instruction"], response, cfg.min_response_chars)
        if problem:
            reject(cand["index"], problem[0], problem[1], raw, id=cid)
            continue
        checked["instance_benchmark_overlap"] += 1
        overlap = bench.check(f"{cand['input']}\n{response}", near=False)
        if overlap:
            reject(cand["index"], "instance_benchmark_overlap", f"input or output {overlap}", raw, id=cid)
            continue
        params = {
            "prompt_version": PROMPT_VERSION,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_new_tokens_instruction": cfg.max_new_tokens_instruction,
            "max_new_tokens_instance": cfg.max_new_tokens_instance,
            "max_new_tokens_response": cfg.max_new_tokens_response,
            "seed_tasks_per_prompt": k,
            "synthetic_tasks_per_prompt": cfg.synthetic_tasks_per_prompt,
            "new_tasks_per_prompt": cfg.new_tasks_per_prompt,
            "config_seed": cfg.seed,
            "round": round_index,
            "instruction_seed": instruction_seed,
            "instance_seed": cand["instance_seed"],
            "response_seed": cand["response_seed"],
            "rouge_threshold": cfg.rouge_threshold,
        }
        scores = {
            "rouge_l_max": float(cand["rouge"]),
            "rouge_l_nearest": cand["nearest"],
            "instruction_words": instruction_word_count(cand["instruction"]),
            "input_chars": len(cand["input"]),
            "response_chars": len(response),
        }
        rows.append(schema.make_row(
            messages, source=SOURCE, origin="synthetic",
            category="classification" if cand["classification"] else None, source_index=cand["index"],
            teacher=teacher.name, seed_ids=cand["seed_ids"], generation_params=json.dumps(params, sort_keys=True),
            rouge_l_max=float(cand["rouge"]), filter_scores=json.dumps(scores, sort_keys=True),
            instruction=cand["instruction"], input=cand["input"], instance_order=cand["order"],
        ))
    return {
        "round": round_index, "calls": calls, "candidates": candidate_index - state.candidates,
        "pool_added": pool_added, "rows": rows, "rejects": rejects, "checked": dict(checked),
    }


def generate_synthetic_instructions(
    seed_rows: pd.DataFrame,
    teacher: Teacher | None,
    cfg: SelfInstructConfig,
    benchmark_questions: Sequence[str] = (),
    cache_dir: str | Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    teacher_id: str | None = None,
    teacher_factory: Callable[[], Teacher] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Run Self-Instruct; returns (accepted canonical rows, rejected candidates, stats).

    With `cache_dir`, every finished round is appended to `<cache_dir>/<key>.jsonl`, the key hashing
    the seed data, the teacher (`teacher_id`, else the teacher's fingerprint), the generation config
    (all but num_instructions and max_attempts) and the benchmark. A later call with the same key
    replays the journal and asks the teacher only for rounds it does not have. Round r depends only on
    the seed, r and the rounds before it, so a resumed run returns exactly what an uninterrupted one
    would, and raising the target or the budget extends earlier work. `teacher_factory` builds the
    teacher lazily, only when a round must really be generated (then `teacher_id` is required).
    """
    stats: dict[str, Any] = {
        "attempts": 0, "rounds": 0, "candidates": 0, "accepted": 0, "rejected": 0, "surplus": 0,
        "rejected_by_reason": {}, "filters": [], "stopped": "target_reached", "teacher": None,
        "reused_rounds": 0, "new_rounds": 0, "new_calls": 0, "journal": None, "generation_key": None,
    }
    if cfg.num_instructions == 0:
        accepted, rejected = _empty_frames()
        return accepted, rejected, stats
    if teacher is None and teacher_factory is None:
        raise ValueError("pass a teacher or a teacher_factory")
    seeds, pool_texts = seed_pool(seed_rows)
    if not seeds:
        raise ValueError("seed_rows has no usable human seed rows (origin == 'human' with a non-empty prompt)")

    benchmark_questions = [str(q) for q in benchmark_questions]
    tid = teacher_id or (teacher_fingerprint(teacher) if teacher is not None else None)
    if tid is None:
        raise ValueError("teacher_id is required with a teacher_factory")
    key = generation_key(seed_data_version(seed_rows), tid, cfg, benchmark_questions)
    journal = GenerationJournal(Path(cache_dir) / f"{key['key']}.jsonl", key) if cache_dir is not None else None
    recorded = journal.load() if journal else []

    state = _State(seeds, pool_texts, cfg)
    bench = BenchmarkOverlap(benchmark_questions, rouge_threshold=cfg.rouge_threshold)

    def keep_going() -> bool:
        if len(state.rows) >= cfg.num_instructions:
            stats["stopped"] = "target_reached"
            return False
        if cfg.max_attempts - state.attempts < cfg.calls_per_round:
            stats["stopped"] = "budget_exhausted"
            return False
        return True

    while keep_going():
        r = state.rounds
        reused = r < len(recorded)
        if reused:
            record = recorded[r]
            stats["reused_rounds"] += 1
        else:
            if teacher is None:
                teacher = teacher_factory()  # type: ignore[misc]
            record = _run_round(r, state, teacher, cfg, bench)
            if journal:
                journal.append(record)  # persisted before the next round starts
            stats["new_rounds"] += 1
            stats["new_calls"] += record["calls"]
        state.apply(record, live=not reused)
        if progress:
            progress({"round": r, "reused": reused, "accepted": len(state.rows), "attempts": state.attempts})

    rows = state.rows[: cfg.num_instructions]
    accepted_df, rejected_df = _empty_frames()
    if rows:
        accepted_df = pd.DataFrame(rows, columns=accepted_df.columns)
    if state.rejects:
        rejected_df = pd.DataFrame(state.rejects, columns=rejected_df.columns)
    filters = []
    for name, reasons in FILTERS:
        n_checked = state.checked.get(name, 0)
        n_rejected = sum(state.reasons[r] for r in reasons)
        filters.append({
            "filter": name, "checked": n_checked, "rejected": n_rejected,
            "pass_rate": round((n_checked - n_rejected) / n_checked, 4) if n_checked else None,
        })
    names = sorted({row["teacher"] for row in state.rows})
    stats.update(
        attempts=state.attempts, rounds=state.rounds, candidates=state.candidates,
        accepted=len(rows), rejected=len(state.rejects), surplus=len(state.rows) - len(rows),
        rejected_by_reason={r: state.reasons[r] for r in REASONS if state.reasons[r]},
        filters=filters,
        teacher=getattr(teacher, "name", None) or (names[0] if names else tid),
        journal=str(journal.path) if journal else None, generation_key=key["key"],
    )
    return accepted_df, rejected_df, stats


__all__ = ["SOURCE", "STAGE", "generate_synthetic_instructions"]
