"""Prepare every endpoint's SQL against empty tables with the declared columns."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import duckdb

from engine.config import ConfigError
from engine.endpoints import EndpointSpec
from engine.params import ParamSpec
from engine.settings import Settings
from engine.sql import lock_down, quote_ident


@contextmanager
def declared_tables(settings: Settings) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory database with an empty table per declared dataset (its declared columns).
    Raises ConfigError naming the `columns` key of a type DuckDB does not know."""
    con = duckdb.connect()
    try:
        for ds in settings.datasets.values():
            cols = ", ".join(f"{quote_ident(c)} {t}" for c, t in ds.columns.items())
            try:
                con.execute(f"CREATE TABLE {quote_ident(ds.name)} ({cols})")
                # One row of NULLs: a run then evaluates the parameters' casts (an empty
                # table evaluates nothing, and hides a parameter that cannot bind).
                con.execute(f"INSERT INTO {quote_ident(ds.name)} DEFAULT VALUES")
            except duckdb.Error as exc:
                key = f"datasets.{ds.name}.columns"
                raise ConfigError(settings.origin(key), key, f"invalid column type: {exc}") \
                    from None
        lock_down(con)  # as the serving connections run: endpoint SQL reads no file or URL
        yield con
    finally:
        con.close()


@contextmanager
def only(con: duckdb.DuckDBPyConnection, settings: Settings,
         spec: EndpointSpec) -> Iterator[None]:
    """Within this block only the endpoint's declared datasets exist in `con`, so SQL that
    reads another one fails to bind."""
    con.execute("BEGIN")
    try:
        for other in settings.datasets:
            if other not in spec.datasets:
                con.execute(f"DROP TABLE {quote_ident(other)}")
        yield
    finally:
        con.execute("ROLLBACK")


def sample(spec: ParamSpec) -> Any:
    """A value a request may bind to `spec` (None where none is known to be valid)."""
    if spec.default is not None:
        return spec.default
    one: Any
    if spec.type == "enum":
        one = spec.values[0]
    elif spec.type == "int":
        one = int(spec.min if spec.min is not None else min(1, spec.max or 1))
    elif spec.type == "float":
        one = float(spec.min if spec.min is not None else min(1.0, spec.max or 1.0))
    elif spec.type == "bool":
        one = True
    elif spec.pattern is None or re.fullmatch(spec.pattern, "x"):
        one = "x"
    else:
        return None
    return [one] if spec.is_list else one


def check_sql(settings: Settings) -> None:
    """Raise ConfigError naming the endpoint's `sql` key if its SQL does not prepare, or
    fails on a row of NULLs with a value of each parameter's declared type (a string
    parameter compared with an INTEGER column, say: every request would fail)."""
    with declared_tables(settings) as con:
        for ep in settings.endpoints.values():
            key = f"endpoints.{ep.name}.sql"
            try:
                with only(con, settings, ep):
                    con.execute(f"PREPARE duckswap_check AS {ep.sql}")
                    samples = {n: sample(p) for n, p in ep.params.items()}
                    try:
                        con.execute(f"SELECT * FROM ({ep.sql}) LIMIT 1", samples).fetchall()
                    except (duckdb.ConversionException, duckdb.InvalidInputException) as exc:
                        given = ", ".join(f"${n} = {v!r}" for n, v in samples.items())
                        raise ConfigError(settings.origin(key), key, "fails with values of the "
                                          f"parameters' declared types ({given}): "
                                          f"{str(exc).splitlines()[0]}") from None
                    if ep.warm_sql:
                        key = f"endpoints.{ep.name}.warm_sql"
                        cur = con.execute(f"SELECT * FROM ({ep.warm_sql}) LIMIT 0")
                        extra = [d[0] for d in cur.description or [] if d[0] not in ep.params]
                        if extra:
                            raise ConfigError(settings.origin(key), key,
                                              f"column {extra[0]!r} is not a parameter")
            except duckdb.Error as exc:
                first = str(exc).splitlines()[0]
                raise ConfigError(settings.origin(key), key,
                                  f"SQL does not prepare: {first}") from None
