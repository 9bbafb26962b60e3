"""Per-version constants: uncorrelated scalar subqueries are computed once per version."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import Running, demo_settings, wait_for
from engine.fold import Constant, Folded, evaluate, fold, fold_endpoints
from engine.settings import Settings, parse_settings
from engine.sqlcheck import declared_tables, only
from serving.app import WARMER
from serving.state import SERVING


def _fold(settings: Settings, name: str, sql: str) -> Folded | None:
    spec = replace(settings.endpoints[name], sql=sql)
    with declared_tables(settings) as con, only(con, settings, spec):
        return fold(con, spec)


def test_only_constant_subqueries_are_folded(tmp_path: Path) -> None:
    settings = demo_settings(tmp_path)
    folded = fold_endpoints(settings)
    matchup = folded["matchup"]
    assert "(SELECT max(patch) FROM patches)" not in matchup.sql
    assert "m.patch = CAST($__duckswap_c0 AS VARCHAR)" in matchup.sql
    assert [c.sql for c in matchup.constants] == ["SELECT (SELECT max(patch) FROM patches)"]
    assert "coalesce($patch, CAST($__duckswap_c0 AS VARCHAR))" in folded["champion_stats"].sql
    assert "champions" not in folded and "champion_trend" not in folded  # nothing to fold
    base = "SELECT m.games FROM matchups m WHERE m.champion_id = $champion_id AND "
    kept = {
        "correlated": base + "m.games > (SELECT avg(games) FROM matchups x "
                             "WHERE x.role = m.role)",
        "a request parameter inside": base + "m.patch = (SELECT max(patch) FROM patches "
                                             "WHERE patch < $role)",
        "a CTE that could shadow a table": "WITH patches AS (SELECT '1' AS patch) " + base
                                           + "m.patch = (SELECT max(patch) FROM patches)",
        "not a plain scalar": base + "[m.patch] = (SELECT [max(patch)] FROM patches)",
        "a table the endpoint does not declare": base + "m.champion_id = "
                                                        "(SELECT max(champion_id) FROM champions)",
    }
    for why, sql in kept.items():
        assert _fold(settings, "matchup", sql) is None, why
    same = _fold(settings, "matchup", base + "m.patch = (SELECT max(patch) FROM patches) "
                 "AND m.role <> (SELECT max(patch) FROM patches) AND m.games > "
                 "(SELECT count(*) FROM patches)")
    assert same is not None and len(same.constants) == 2  # one parameter per distinct subquery
    assert "m.games > CAST($__duckswap_c1 AS BIGINT)" in same.sql


def test_a_constant_that_fails_leaves_the_sql_as_written(tmp_path: Path) -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE patches AS SELECT * FROM (VALUES ('26.01'), ('26.02')) t(patch)")
    ok = Folded("", (Constant("__duckswap_c0", "SELECT (SELECT max(patch) FROM patches)"),))
    assert evaluate(con, ok) == {"__duckswap_c0": "26.02"}
    con.register("keys", pa.table({"k": [1]}))  # no result left unfinished on the cursor
    several = Folded("", (Constant("__duckswap_c0", "SELECT (SELECT patch FROM patches)"),))
    assert evaluate(con, several) is None


def _write(root: Path, seq: int, patches: list[str]) -> None:
    """One export of `patches` and `stats` (a row per patch and id; games carry the seq)."""
    tables = {
        "patches": pa.table({"patch": pa.array(patches)}),
        "stats": pa.table({
            "patch": pa.array([p for p in patches for _ in range(3)]),
            "id": pa.array([i for _ in patches for i in range(3)], pa.int32()),
            "games": pa.array([seq * 100 + i for _ in patches for i in range(3)], pa.int64()),
        }),
    }
    for name, table in tables.items():
        folder = root / name / f"export-{seq:06d}"
        folder.mkdir(parents=True)
        pq.write_table(table, folder / "part-00000.parquet")
        (folder / "_SUCCESS").write_text("")


def _settings(root: Path, **server: Any) -> Settings:
    latest = "SELECT patch, id, games FROM stats WHERE patch = (SELECT max(patch) FROM patches)"
    return parse_settings({
        "server": {"threads": 2, **server},
        "source": {"url": f"file://{root}", "debounce_ms": 20},
        "datasets": {
            "patches": {"key": ["patch"], "columns": {"patch": "VARCHAR"}},
            "stats": {"key": ["id"], "columns": {"patch": "VARCHAR", "id": "INTEGER",
                                                 "games": "BIGINT"}},
        },
        "endpoints": {
            "latest": {
                "path": "/v1/latest/{id}", "datasets": ["stats", "patches"], "row_limit": 1,
                "sql": latest + " AND id = $id",
                "warm_sql": "SELECT DISTINCT id FROM stats",
                "params": {"id": {"type": "int", "min": 0}},
            },
            "only": {  # a scalar subquery that fails once there are two patches
                "path": "/v1/only/{id}", "datasets": ["stats", "patches"], "row_limit": 1,
                "sql": "SELECT patch, games FROM stats WHERE id = $id "
                       "AND patch = (SELECT patch FROM patches)",
                "params": {"id": {"type": "int", "min": 0}},
            },
        },
    }, "test.toml")


async def test_constants_follow_each_version_on_every_path(tmp_path: Path, serve: Any) -> None:
    """Misses (cache off), batched warm answers and single queries all bind the value of
    the version they answer for; a constant that fails there answers as the SQL as written."""
    _write(tmp_path, 1, ["26.01"])
    cached: Running = await serve(_settings(tmp_path))
    uncached: Running = await serve(_settings(tmp_path, cache_mb=0))
    for srv in (cached, uncached):
        await srv.wait_ready()
        assert set(srv.app[SERVING].constants.folded) == {"latest", "only"}
        status, body = await srv.get("/v1/latest/2")
        assert status == 200 and body["data"] == [{"patch": "26.01", "id": 2, "games": 102}]
        status, body = await srv.get("/v1/only/1")
        assert status == 200 and body["data"] == [{"patch": "26.01", "games": 101}]
    _write(tmp_path, 2, ["26.01", "26.02"])
    for srv in (cached, uncached):
        async def moved(s: Running = srv) -> bool:
            _, body = await s.get("/v1/latest/1")
            return bool(body["data"]) and body["data"][0]["games"] == 201
        await wait_for(moved, what="export 2")
        for i in range(3):
            status, body = await srv.get(f"/v1/latest/{i}")
            assert status == 200 and body["data"] == [{"patch": "26.02", "id": i,
                                                       "games": 200 + i}]
        status, body = await srv.get("/v1/only/1")  # DuckDB refuses the subquery, as written
        assert status == 500 and body["error"] == "query_failed"

    async def warmed_both() -> bool:  # `only` failing in the warm did not stop `latest`'s
        return cached.app[WARMER].warmed >= 6

    await wait_for(warmed_both, what="both versions of `latest` warmed")
    assert uncached.app[SERVING].cache.hits == 0
