"""Declared endpoints: results equal DuckDB on the same Parquet; bad input gets a clear 400."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest

from conftest import Running, demo_settings, seq_config, write_seq_export
from data.generate import write_export
from engine.params import bind_params

# (endpoint name, URL, path values, query)
DEMO_CALLS = [
    ("champion_stats", "/v1/champions/3/stats?role=mid", {"champion_id": "3"}, {"role": ["mid"]}),
    ("champion_stats", "/v1/champions/5/stats?role=top&rank=gold&region=na&patch=25.02",
     {"champion_id": "5"},
     {"role": ["top"], "rank": ["gold"], "region": ["na"], "patch": ["25.02"]}),
    ("tier_list", "/v1/tierlist/mid?min_games=10&limit=5", {"role": "mid"},
     {"min_games": ["10"], "limit": ["5"]}),
    ("tier_list", "/v1/tierlist/top?ranks=iron,gold&region=euw&min_games=0", {"role": "top"},
     {"ranks": ["iron,gold"], "region": ["euw"], "min_games": ["0"]}),
    ("champion_trend", "/v1/champions/2/trend?role=jungle&ranks=iron&ranks=silver",
     {"champion_id": "2"}, {"role": ["jungle"], "ranks": ["iron", "silver"]}),
    ("champion_builds", "/v1/champions/4/builds?role=bot&limit=3", {"champion_id": "4"},
     {"role": ["bot"], "limit": ["3"]}),
    ("matchup", "/v1/matchups/1/2?role=support", {"champion_id": "1", "opponent_id": "2"},
     {"role": ["support"]}),
    ("champions", "/v1/champions?prefix=k", {}, {"prefix": ["k"]}),
]


@pytest.fixture
async def demo(tmp_path: Path, serve) -> Running:
    write_export(tmp_path, 1, size="small")
    srv: Running = await serve(demo_settings(tmp_path))
    await srv.wait_ready()
    return srv


def _direct(root: Path, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    con = duckdb.connect()
    for ds in ("patches", "champions", "champion_stats", "champion_builds", "matchups"):
        con.execute(
            f"CREATE VIEW {ds} AS SELECT * FROM read_parquet('{root}/{ds}/export-000001/*.parquet')"
        )
    cur = con.execute(sql, params)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


@pytest.mark.parametrize(("name", "url", "path_values", "query"), DEMO_CALLS)
async def test_demo_endpoint_equals_direct_duckdb(
    demo: Running, tmp_path: Path, name: str, url: str, path_values: dict[str, str],
    query: dict[str, list[str]],
) -> None:
    spec = demo_settings(tmp_path).endpoints[name]
    status, body = await demo.get(url)
    assert status == 200, body
    expected = _direct(tmp_path, spec.sql, bind_params(spec.params, path_values, query))
    assert expected, "the call should select rows on the small demo data"
    assert body["data"] == expected
    assert body["meta"]["rows"] == len(expected)
    assert set(body["meta"]["versions"]) == set(spec.datasets)


async def test_every_demo_endpoint_is_covered(tmp_path: Path) -> None:
    assert {c[0] for c in DEMO_CALLS} == set(demo_settings(tmp_path).endpoints)


@pytest.mark.parametrize(
    ("url", "parameter", "fragment"),
    [
        ("/v1/champions/abc/stats?role=mid", "champion_id", "expected an integer"),
        ("/v1/champions/0/stats?role=mid", "champion_id", "expected a value >= 1"),
        ("/v1/champions/3/stats?role=wizard", "role", "expected one of top, jungle"),
        ("/v1/champions/3/stats", "role", "required parameter"),
        ("/v1/champions/3/stats?role=mid&patch=1'%20OR%201=1--", "patch",
         r"matching the pattern \d{2}\.\d{2}, got"),
        ("/v1/champions/3/stats?role=mid&region=euw;DROP%20TABLE%20x", "region", "expected one"),
        ("/v1/champions/3/stats?role=mid&rank=gold&rank=iron", "rank", "single value"),
        ("/v1/champions/3/stats?role=mid&debug=1", "debug", "unknown parameter"),
        ("/v1/tierlist/mid?limit=1e9", "limit", "expected an integer"),
        ("/v1/tierlist/mid?ranks=gold,x", "ranks", "expected one of"),
        ("/v1/champions?prefix=a'%3B--", "prefix", "matching"),
    ],
)
async def test_bad_parameters_get_400_naming_the_parameter(
    demo: Running, url: str, parameter: str, fragment: str
) -> None:
    status, body = await demo.get(url)
    assert status == 400
    assert body["error"] == "bad_parameter" and body["status"] == 400
    assert body["parameter"] == parameter
    assert fragment in body["message"]


async def test_string_values_are_bound_not_pasted(tmp_path: Path, serve) -> None:
    write_seq_export(tmp_path, 1)
    settings = seq_config(tmp_path)
    srv: Running = await serve(settings)
    await srv.wait_ready()
    status, body = await srv.get("/v1/rows?min_k=1%20OR%201=1")
    assert status == 400 and body["parameter"] == "min_k"


async def test_unknown_route_and_method(demo: Running) -> None:
    status, body = await demo.get("/v1/nope")
    assert status == 404 and body["error"] == "not_found"
    async with demo.session.post(demo.url("/v1/champions")) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"] == "method_not_allowed"


async def test_cacheable_documents_refuse_query_parameters(demo: Running) -> None:
    """Each one would be another CDN key for the same bytes."""
    for path in ("/v1/version?t=1", "/openapi.json?x=1"):
        status, body = await demo.get(path)
        assert status == 400 and body["message"] == f"{path[-3]}: unknown parameter", body


async def test_health_answers_are_never_cached(demo: Running) -> None:
    await demo.wait_ready()
    for path in ("/healthz", "/readyz"):
        async with demo.session.get(demo.url(path)) as resp:
            assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"


async def test_row_limit_truncates_and_says_so(demo: Running) -> None:
    status, body = await demo.get("/v1/champions/3/trend?role=mid&patches=100")
    assert status == 200 and body["meta"]["rows"] == 3  # 3 patches in the small data
    status, body = await demo.get("/v1/tierlist/mid?min_games=0&limit=200&ranks=iron,gold")
    assert status == 200 and body["meta"]["rows"] == 12 and not body["meta"]["truncated"]


async def test_row_limit_truncation(tmp_path: Path, serve) -> None:
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path, row_limit=10))
    await srv.wait_ready()
    status, body = await srv.get("/v1/rows")
    assert status == 200 and len(body["data"]) == 10 and body["meta"]["truncated"] is True


async def test_not_ready_until_loaded(tmp_path: Path, serve) -> None:
    srv: Running = await serve(seq_config(tmp_path))
    async with srv.session.get(srv.url("/v1/rows")) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"] == "not_ready"
    status, body = await srv.get("/readyz")
    assert status == 503 and body["missing"] == ["seqdata"]
    status, body = await srv.get("/healthz")
    assert status == 200
    write_seq_export(tmp_path, 1)
    await srv.wait_ready()
    status, body = await srv.get("/v1/rows")
    assert status == 200


async def test_query_past_deadline_is_interrupted_with_504(tmp_path: Path, serve) -> None:
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path, query_timeout=0.3))
    await srv.wait_ready()
    status, body = await srv.get("/v1/slow?x=-1")
    assert status == 504 and body["error"] == "query_timeout"
    # The pool is free again: the interrupted query does not hold a thread.
    for _ in range(4):
        status, _ = await srv.get("/v1/rows")
        assert status == 200
