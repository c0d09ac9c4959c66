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


def load_suite(path: str | Path):
    """A GE ExpectationSuite from its JSON file; a bad file names itself in the error."""
    from great_expectations.core.expectation_suite import ExpectationSuite

    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        return ExpectationSuite(**spec)
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as err:
        raise ValueError(f"expectation suite {path} is not a valid suite: {err}") from err


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
    """Validate `frame` against the suite at `path` with an ephemeral GE context."""
    import great_expectations as gx

    suite = load_suite(path)
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
    outcomes = [
        ExpectationOutcome(
            expectation=r.expectation_config.type,
            column=r.expectation_config.kwargs.get("column"),
            success=bool(r.success),
            observed=_observed(r.result or {}) if not r.exception_info.get("raised_exception") else r.exception_info.get("exception_message"),
            kwargs={k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"},
        )
        for r in result.results
    ]
    return SuiteResult(suite=suite.name, success=bool(result.success), outcomes=outcomes)


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
