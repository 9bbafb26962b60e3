"""Prepare every endpoint's SQL against empty tables with the declared columns."""

from __future__ import annotations

import duckdb

from loaders.build import quote_ident
from serving.settings import ConfigError, Settings


def check_sql(settings: Settings) -> None:
    """Raise ConfigError naming the endpoint's `sql` key if its SQL does not prepare."""
    con = duckdb.connect()
    try:
        for ds in settings.datasets.values():
            cols = ", ".join(f"{quote_ident(c)} {t}" for c, t in ds.columns.items())
            try:
                con.execute(f"CREATE TABLE {quote_ident(ds.name)} ({cols})")
            except duckdb.Error as exc:
                raise ConfigError(
                    settings.file, f"datasets.{ds.name}.columns", f"invalid column type: {exc}"
                ) from None
        for ep in settings.endpoints.values():
            try:
                # Only the declared datasets are visible, so reading another one fails here too.
                con.execute("BEGIN")
                for other in settings.datasets:
                    if other not in ep.datasets:
                        con.execute(f"DROP TABLE {quote_ident(other)}")
                key = f"endpoints.{ep.name}.sql"
                con.execute(f"PREPARE duckswap_check AS {ep.sql}")
                if ep.warm_sql:
                    key = f"endpoints.{ep.name}.warm_sql"
                    cur = con.execute(f"SELECT * FROM ({ep.warm_sql}) LIMIT 0")
                    extra = [d[0] for d in cur.description or [] if d[0] not in ep.params]
                    if extra:
                        raise ConfigError(settings.file, key,
                                          f"column {extra[0]!r} is not a parameter")
            except duckdb.Error as exc:
                first = str(exc).splitlines()[0]
                raise ConfigError(settings.file, key, f"SQL does not prepare: {first}") from None
            finally:
                con.execute("ROLLBACK")
    finally:
        con.close()
