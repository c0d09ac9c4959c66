"""Great Expectations suites, stored as JSON in `expectations/`, run on flat views of pipeline tables.

Editing a suite's JSON changes what is checked with no code change. Suites run on flat views:
`conversation_view` turns canonical rows into scalar columns GE can check (roles, lengths).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sft_pipeline.curation.tokens import approx_token_count

log = logging.getLogger(__name__)

EXPECTATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "expectations"


@dataclass
class ExpectationOutcome:
    """One expectation's verdict, with what was observed."""

    expectation: str
    column: str | None
    success: bool
    observed: Any
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SuiteResult:
    """A suite's verdict on one table."""

    suite: str
    success: bool
    outcomes: list[ExpectationOutcome]

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def as_table(self) -> list[dict[str, Any]]:
        """One plain dict per expectation, for metadata tables."""
        return [
            {"expectation": o.expectation, "column": o.column or "", "success": o.success, "observed": _short(o.observed)}
            for o in self.outcomes
        ]


def _short(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suite_path(name: str, directory: str | Path | None = None) -> Path:
    """Path of the suite `name` (e.g. `clean_instructions`) in the expectations folder."""
    directory = Path(directory or os.environ.get("SFT_PIPELINE_EXPECTATIONS", EXPECTATIONS_DIR))
    path = directory / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"expectation suite {path} does not exist")
    return path


@dataclass
class SuiteEntryProblem:
    """A declared expectation that could not be built: its position in the file, what it says, why."""

    index: int
    expectation: str
    column: str | None
    message: str


def _build_suite(path: str | Path):
    """(GE ExpectationSuite of the well-formed entries, problems of the others) of a suite file.

    Each entry is built on its own: GE's `ExpectationSuite(**spec)` logs and drops an entry whose
    type it does not know, so a typo would silently switch a check off. A file that is not a suite
    at all raises a ValueError naming the file.
    """
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"expectation suite {path} is not valid JSON: {err}") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("expectations"), list):
        raise ValueError(f"expectation suite {path} is not a valid suite: it needs an object with an 'expectations' list")
    declared = spec.pop("expectations")
    if not declared:
        raise ValueError(f"expectation suite {path} declares no expectations: it would check nothing")
    built, problems = [], []
    for index, entry in enumerate(declared):
        kind = entry.get("type") if isinstance(entry, dict) else None
        kwargs = entry.get("kwargs") if isinstance(entry, dict) else None
        column = kwargs.get("column") if isinstance(kwargs, dict) else None
        try:
            if not isinstance(entry, dict):
                raise TypeError(f"an entry must be an object, got {type(entry).__name__}")
            built.append(ExpectationConfiguration(**entry).to_domain_obj())
        except Exception as err:  # GE raises several unrelated types (not found, pydantic, TypeError)
            reason = " ".join(str(err).split())
            problems.append(SuiteEntryProblem(index, str(kind), column, f"{path}: expectations[{index}] ({kind}) cannot be evaluated: {reason}"))
    try:
        suite = ExpectationSuite(expectations=built, **spec)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"expectation suite {path} is not a valid suite: {err}") from err
    return suite, problems


def load_suite(path: str | Path):
    """A GE ExpectationSuite from its JSON file; a bad file or entry names itself in the error."""
    suite, problems = _build_suite(path)
    if problems:
        raise ValueError("; ".join(p.message for p in problems))
    return suite


def column_range(path: str | Path, column: str) -> tuple[float | None, float | None]:
    """(min, max) that the suite at `path` allows for `column`'s values
    (`expect_column_values_to_be_between`, the tightest if several); (None, None) when unbounded."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"expectation suite {path} is not valid JSON: {err}") from err
    lows, highs = [], []
    for entry in spec.get("expectations", []) if isinstance(spec, dict) else []:
        kwargs = entry.get("kwargs") if isinstance(entry, dict) else None
        if entry.get("type") == "expect_column_values_to_be_between" and isinstance(kwargs, dict) and kwargs.get("column") == column:
            if kwargs.get("min_value") is not None:
                lows.append(kwargs["min_value"])
            if kwargs.get("max_value") is not None:
                highs.append(kwargs["max_value"])
    return (max(lows) if lows else None, min(highs) if highs else None)


def _exception_message(info: dict[str, Any]) -> str | None:
    """The first exception message in a result's exception info (flat, or keyed by metric)."""
    if info.get("raised_exception"):
        return info.get("exception_message") or "raised an exception"
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return value.get("exception_message") or "raised an exception"
    return None


def _observed(result: dict[str, Any]) -> Any:
    if "observed_value" in result:
        return result["observed_value"]
    if "unexpected_count" in result:
        return {
            "unexpected_count": result.get("unexpected_count"),
            "unexpected_percent": round(result.get("unexpected_percent") or 0.0, 3),
            "sample": result.get("partial_unexpected_list", [])[:5],
        }
    return result or None


def validate_frame(frame: pd.DataFrame, path: str | Path) -> SuiteResult:
    """Validate `frame` against the suite at `path` with an ephemeral GE context.

    The result fails, with the file and entry named in its failed outcomes, when an entry cannot
    be built, an expectation raised, or fewer expectations were evaluated than the file declares.
    """
    import great_expectations as gx

    suite, problems = _build_suite(path)
    declared = len(suite.expectations) + len(problems)
    outcomes = [
        ExpectationOutcome(expectation=p.expectation, column=p.column, success=False, observed=p.message)
        for p in problems
    ]
    evaluated, ge_success = 0, True
    if suite.expectations:
        context = gx.get_context(mode="ephemeral")
        try:
            from great_expectations.data_context.types.base import ProgressBarsConfig

            context.variables.progress_bars = ProgressBarsConfig(globally=False)
        except ImportError:  # older GE 1.x: progress bars are only cosmetic
            pass
        batch = (
            context.data_sources.add_pandas("sft_pipeline")
            .add_dataframe_asset(suite.name)
            .add_batch_definition_whole_dataframe("whole")
            .get_batch(batch_parameters={"dataframe": frame})
        )
        result = batch.validate(suite)
        for r in result.results:
            error = _exception_message(r.exception_info or {})
            outcomes.append(
                ExpectationOutcome(
                    expectation=r.expectation_config.type,
                    column=r.expectation_config.kwargs.get("column"),
                    success=bool(r.success) and error is None,
                    observed=_observed(r.result or {}) if error is None else f"{path}: {error}",
                    kwargs={k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"},
                )
            )
        evaluated, ge_success = len(result.results), bool(result.success)
    if evaluated + len(problems) != declared:
        outcomes.append(
            ExpectationOutcome(
                expectation="suite_integrity", column=None, success=False,
                observed=f"{path}: the suite declares {declared} expectations but {evaluated} evaluated"
                         f"{f' and {len(problems)} could not be built' if problems else ''}",
            )
        )
    return SuiteResult(suite=suite.name, success=ge_success and all(o.success for o in outcomes), outcomes=outcomes)


def conversation_view(rows: pd.DataFrame) -> pd.DataFrame:
    """Scalar columns of canonical rows that suites check: roles, turn counts, lengths in
    characters and in approximate tokens (`sft_pipeline.curation.tokens.approx_token_count`)."""
    messages = rows["messages"] if "messages" in rows else pd.Series([], dtype=object)
    roles = [[m["role"] for m in turns] for turns in messages]
    return pd.DataFrame(
        {
            "id": rows.get("id", pd.Series([], dtype=object)).tolist(),
            "source": rows.get("source", pd.Series([], dtype=object)).tolist(),
            "origin": rows.get("origin", pd.Series([], dtype=object)).tolist(),
            "prompt": rows.get("prompt", pd.Series([], dtype=object)).tolist(),
            "response": rows.get("response", pd.Series([], dtype=object)).tolist(),
            "role_sequence": [",".join(r) for r in roles],
            "last_role": [r[-1] if r else None for r in roles],
            "num_turns": [len(r) for r in roles],
            "conversation_chars": [sum(len(m["content"]) for m in turns) for turns in messages],
            "approx_tokens": [sum(approx_token_count(m["content"]) for m in turns) for turns in messages],
            "prompt_chars": [sum(len(m["content"]) for m in turns if m["role"] == "user") for turns in messages],
            "response_chars": [sum(len(m["content"]) for m in turns if m["role"] == "assistant") for turns in messages],
        }
    )


def curation_summary(rows_in: int, kept: int, rejected: int) -> pd.DataFrame:
    """A one-row table of the curation accounting, for the `curation_summary` suite."""
    return pd.DataFrame(
        [{"rows_in": rows_in, "kept": kept, "rejected": rejected, "accounted": kept + rejected,
          "rejected_share": (rejected / rows_in) if rows_in else 0.0}]
    )


def ingest_summary(records: int, rows: int, unreadable: int) -> pd.DataFrame:
    """A one-row table of the ingest accounting, for the `ingest_summary` suite."""
    return pd.DataFrame(
        [{"records": records, "rows": rows, "unreadable": unreadable, "accounted": rows + unreadable,
          "unreadable_share": (unreadable / records) if records else 0.0}]
    )
