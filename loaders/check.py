"""`duckswap check-export`: the server's checks of an export, run on a local folder before it
is uploaded. The same functions as a load (`loaders.build`), so the same reasons; every problem
found, not only the first; nothing written into the folder (the table is built in a temporary
folder and thrown away)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import duckdb

from engine.schema import DatasetSchema
from loaders.build import TOTAL, audit, build_file, size_problems, type_problems, validate_files
from loaders.errors import LoadError
from loaders.source import MARKERS, Export, marker_of, parts_of


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    version_id: str | None = None  # the version id the server would give it
    rows: int | None = None  # rows, once it built


def check_folder(folder: Path, schema: DatasetSchema, threads: int = 2) -> CheckReport:
    """Everything the server would check of the export in `folder` for dataset `schema`."""
    report = CheckReport()
    problems = report.problems
    marker = marker_of(folder)
    if marker is None:
        problems.append(f"no marker ({' or '.join(MARKERS)}): the server waits for one "
                        "(or for source.quiet_seconds without a change)")
    files = parts_of(folder)
    export = Export(schema.name, folder.name, folder, files, marker or "", "",
                    {p.name: p.stat().st_size for p in files})
    problems.extend(size_problems(export.sizes, schema))
    version_id, expected, found = audit(export, schema.allow_empty)
    problems.extend(found)
    if not found:
        report.version_id = version_id
    readable = True
    for path in files:  # each part on its own, so every bad one is named
        try:
            validate_files(replace(export, files=(path,)), schema,
                           {k: v for k, v in expected.items() if k == path.name})
        except LoadError as exc:
            problems.append(str(exc))
            readable = False
    if not readable or (not files and not schema.allow_empty):
        return report  # building unreadable, incomplete or no parts says nothing more
    if TOTAL in expected:
        try:
            validate_files(export, schema, {TOTAL: expected[TOTAL]})
        except LoadError as exc:
            problems.append(str(exc))
    con = duckdb.connect()
    try:  # every part's types (a build stops at the first part that is wrong)
        types = type_problems(con, [str(p) for p in files], schema)
    finally:
        con.close()
    if types:
        problems.extend(types)
        return report
    with tempfile.TemporaryDirectory(prefix="duckswap-check-") as tmp:
        try:
            report.rows, _ = build_file([str(p) for p in files], schema,
                                        str(Path(tmp) / "check.duckdb"), threads)
        except LoadError as exc:
            problems.append(str(exc))
    return report
