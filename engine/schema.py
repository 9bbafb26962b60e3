"""What a dataset must look like: lookup key, typed columns and the checks an export passes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

EXTRA_COLUMNS = ("keep", "drop", "refuse")


@dataclass(frozen=True)
class DatasetSchema:
    name: str
    key: tuple[str, ...]
    columns: Mapping[str, str]  # required columns and their DuckDB types
    required: bool = True
    extra_columns: str = "keep"  # columns not declared: kept, dropped, or the export refused
    allow_empty: bool = False
    not_null: tuple[str, ...] = ()
    unique_key: tuple[str, ...] = ()  # no two rows share these columns' values
    max_file_bytes: int | None = None
    max_export_bytes: int | None = None
    export: str | None = None  # the export to serve and no other (a fleet's rollback)

    def checks(self) -> dict[str, object]:
        """Everything that decides whether and how an export loads (a cached version built
        under other checks is rebuilt)."""
        return {
            "key": list(self.key), "columns": dict(self.columns),
            "extra_columns": self.extra_columns, "allow_empty": self.allow_empty,
            "not_null": list(self.not_null), "unique_key": list(self.unique_key),
        }


@dataclass(frozen=True)
class RunGroup:
    """Datasets published together: a run is the exports of every member that share one
    export id, published as one Snapshot once all are complete and valid. A dataset in no
    group is a group of its own (`incomplete_seconds` does not apply to it)."""

    name: str
    datasets: tuple[str, ...]
    incomplete_seconds: float = 0.0  # a run complete in some members only is reported after
