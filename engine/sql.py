"""SQL text and connection rules shared by every DuckDB connection duckswap opens."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import duckdb


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def lock_down(con: duckdb.DuckDBPyConnection, readable: Iterable[str | Path] = (),
              files: Iterable[str | Path] = ()) -> None:
    """From now on `con` and its cursors read no file or URL but those under the folders
    `readable` and the `files` named: no `read_*` of anything else, no ATTACH elsewhere, no
    COPY, no extension installed or loaded; and the configuration is locked, so SQL cannot
    turn any of it back on. Every connection that runs endpoint SQL, and every build, runs so."""
    folders = [str(p).rstrip("/") + "/" for p in readable]
    if folders:
        con.execute(f"SET allowed_directories = [{', '.join(map(quote_literal, folders))}]")
    named = [str(p) for p in files]
    if named:
        con.execute(f"SET allowed_paths = [{', '.join(map(quote_literal, named))}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
