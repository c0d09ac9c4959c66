"""Helpers the asset modules share: typed config from domain dataclasses, metadata builders."""


import base64
import dataclasses
import io
import typing
from typing import Any

import dagster as dg
import pandas as pd
import pydantic


def config_from_dataclass(domain_cls: type, name: str, *, exclude: tuple[str, ...] = (), **extra: Any) -> type[dg.Config]:
    """A `dg.Config` class with the fields, defaults and help text of a domain dataclass.

    The domain dataclass stays the single definition of a stage's settings; the Dagster UI
    shows the same fields with their help. `extra` adds Dagster-only fields as (type, Field).
    """
    hints = typing.get_type_hints(domain_cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(domain_cls):
        if f.name in exclude:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        fields[f.name] = (hints[f.name], pydantic.Field(default=default, description=f.metadata.get("help")))
    fields.update(extra)
    return pydantic.create_model(name, __base__=dg.Config, __doc__=domain_cls.__doc__, **fields)


def domain_kwargs(config: dg.Config, domain_cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The subset of a config's values that the domain dataclass accepts."""
    names = {f.name for f in dataclasses.fields(domain_cls)} - set(exclude)
    return {k: v for k, v in config.model_dump().items() if k in names}


def markdown_table(frame: pd.DataFrame, max_rows: int = 20, max_chars: int = 120) -> dg.MetadataValue:
    """A frame as a Markdown table (cells truncated), for asset metadata."""
    def short(value: Any) -> str:
        text = str(value).replace("\n", " ").replace("|", "\\|")
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    head = frame.head(max_rows).map(short) if len(frame) else frame
    if not len(head):
        return dg.MetadataValue.md("_(empty)_")
    return dg.MetadataValue.md(head.to_markdown(index=False))


def counts_table(counts: dict[str, Any], key: str, value: str = "count") -> dg.MetadataValue:
    """A two-column Markdown table from a dict."""
    frame = pd.DataFrame(sorted(counts.items(), key=lambda kv: str(kv[0])), columns=[key, value])
    return markdown_table(frame, max_rows=100)


def png_markdown(figure) -> dg.MetadataValue:
    """A matplotlib figure as an inline PNG in Markdown, which the Dagster UI renders."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{encoded})")


def histogram(values: list[float], title: str, xlabel: str, bins: int = 30) -> dg.MetadataValue:
    """An inline histogram plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3))
    axis.hist(values, bins=bins, color="#4f6bed")
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("rows")
    return png_markdown(figure)


def suite_check_result(result, asset_key: str, **extra_metadata: Any) -> dg.AssetCheckResult:
    """An asset check result from a Great Expectations suite result: failures listed with observed values."""
    metadata: dict[str, Any] = {
        "suite": result.suite,
        "evaluated": len(result.outcomes),
        "failed": len(result.failed),
        "expectations": markdown_table(pd.DataFrame(result.as_table()), max_rows=100, max_chars=160),
        **extra_metadata,
    }
    if result.failed:
        metadata["failed_expectations"] = dg.MetadataValue.json(
            [{"expectation": o.expectation, "column": o.column, "kwargs": o.kwargs, "observed": o.observed} for o in result.failed]
        )
    return dg.AssetCheckResult(
        passed=result.success,
        asset_key=asset_key,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=metadata,
        description=f"Great Expectations suite {result.suite!r}",
    )
