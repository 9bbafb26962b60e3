"""`?format=csv` and `?format=arrow`: the rows and types of the JSON twin, each format cached,
ETagged and warmed like JSON, with canonical URLs (no `Vary`)."""

from __future__ import annotations

import csv
import datetime
import decimal
import io
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from conftest import Running, demo_settings, small_demo, wait_for
from data.generate import write_export
from engine.formats import with_format
from engine.params import bind_params, cache_key
from loaders.warm import WarmPolicy
from serving.state import SERVING

PATHS = [  # every demo endpoint; lists, enums, ints, path and query parameters
    "/v1/champions/1/stats?role=mid&rank=gold&region=euw",
    "/v1/tierlist/mid?ranks=gold,platinum&region=euw",
    "/v1/champions/1/trend?role=mid&ranks=gold",
    "/v1/champions/1/builds?role=mid",
    "/v1/matchups/1/2?role=mid",
    "/v1/champions?prefix=A",
]


@pytest.fixture
async def demo(tmp_path: Path, serve: Any) -> Running:
    return await small_demo(tmp_path, serve)


async def _get(srv: Running, path: str, **headers: str) -> tuple[int, Any, bytes]:
    return await srv.raw(path, **headers)


def _text(value: Any) -> str:
    """A JSON value as its CSV cell."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _as_json(value: Any) -> Any:
    """An Arrow value as the server writes it in JSON."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, datetime.date | datetime.datetime | datetime.time):
        return orjson.loads(orjson.dumps(value))
    if isinstance(value, list):
        return [_as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    return value


async def test_csv_and_arrow_equal_json_row_for_row(demo: Running) -> None:
    for path in PATHS:
        status, headers, body = await _get(demo, path)
        assert status == 200, (path, body)
        rows = orjson.loads(body)["data"]
        assert rows, path
        columns = list(rows[0])

        status, headers, body = await _get(demo, path + "&format=csv")
        assert status == 200 and headers["Content-Type"].startswith("text/csv"), path
        table = list(csv.reader(io.StringIO(body.decode()), lineterminator="\r\n"))
        assert table[0] == columns, path
        assert table[1:] == [[_text(r[c]) for c in columns] for r in rows], path

        status, headers, body = await _get(demo, path + "&format=arrow")
        assert status == 200
        assert headers["Content-Type"] == "application/vnd.apache.arrow.stream"
        arrow = pa.ipc.open_stream(body).read_all()
        assert arrow.column_names == columns, path
        assert [{c: _as_json(v) for c, v in r.items()} for r in arrow.to_pylist()] == rows, path
        meta = arrow.schema.metadata
        assert meta[b"duckswap.token"].decode() == headers["X-Duckswap-Token"]
        assert meta[b"duckswap.truncated"] == b"false"


async def test_arrow_columns_are_typed_as_duckdb_types_them(demo: Running) -> None:
    status, _, body = await _get(demo, "/v1/champions/1/stats?role=mid&rank=gold&region=euw"
                                       "&format=arrow")
    assert status == 200
    schema = pa.ipc.open_stream(body).schema
    types = {f.name: f.type for f in schema}
    assert types["games"] == pa.int64() and types["win_rate"] == pa.float64()
    assert types["role"] == pa.string()
    # An answer with no rows keeps its column types.
    status, _, body = await _get(demo, "/v1/champions/9999/stats?role=mid&rank=gold"
                                       "&region=euw&format=arrow")
    empty = pa.ipc.open_stream(body).read_all()
    assert status == 200 and empty.num_rows == 0 and empty.schema.field("games").type == pa.int64()


async def test_each_format_has_its_own_etag_and_cache_entry(demo: Running) -> None:
    path = "/v1/champions/2/builds?role=top"
    tags = {}
    for fmt in ("json", "csv", "arrow"):
        url = path if fmt == "json" else f"{path}&format={fmt}"
        status, headers, _ = await _get(demo, url)
        assert status == 200 and "Vary" not in headers
        tags[fmt] = headers["ETag"]
        status, again, _ = await _get(demo, url, **{"If-None-Match": headers["ETag"]})
        assert status == 304 and again["ETag"] == headers["ETag"]
        cache = demo.app[SERVING].cache
        misses = cache.misses
        assert (await _get(demo, url))[0] == 200
        assert cache.misses == misses, f"{fmt}: not cached"
    assert len(set(tags.values())) == 3


async def test_a_versioned_url_keeps_its_format(demo: Running) -> None:
    _, doc = await demo.get("/v1/version")
    tok = doc["endpoints"]["champion_builds"]["token"]
    status, headers, body = await _get(demo, f"/v1/champions/2/builds?role=top&format=csv&v={tok}")
    assert status == 200 and headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert headers["Content-Type"].startswith("text/csv") and body.count(b"\r\n") >= 2
    other = "0" * 16
    status, headers, _ = await _get(demo, f"/v1/champions/2/builds?role=top&format=csv&v={other}")
    location = headers["Location"]
    assert status == 307 and "format=csv" in location and f"v={tok}" in location


@pytest.mark.parametrize(("query", "message"), [
    ("format=xml", "format: expected one of json, csv, arrow, got 'xml'"),
    ("format=csv&format=csv", "format: given more than once"),
    ("format=", "format: expected one of json, csv, arrow, got ''")])
async def test_an_unknown_format_is_a_400(demo: Running, query: str, message: str) -> None:
    status, _, body = await _get(demo, f"/v1/champions/2/builds?role=top&{query}")
    doc = orjson.loads(body)
    assert status == 400 and doc["parameter"] == "format" and doc["message"] == message


async def test_popular_csv_answers_are_warmed_before_a_publish(tmp_path: Path,
                                                               serve: Any) -> None:
    """A format's answers count as popular on their own: the next version has the CSV answer
    of a key asked for as CSV before its first request (no time for anything but hot keys)."""
    write_export(tmp_path, 1, size="small")
    srv: Running = await serve(demo_settings(tmp_path),
                               WarmPolicy(seconds=1e-9, tail_seconds=0, busy_seconds=0))
    await srv.wait_ready()
    path = "/v1/matchups/3/5?role=mid"  # declared as JSON only: popularity warms its CSV
    for _ in range(3):
        assert (await _get(srv, path + "&format=csv"))[0] == 200
    _, doc = await srv.get("/v1/version")
    old = doc["endpoints"]["matchup"]["token"]
    write_export(tmp_path, 2, size="small")

    async def swapped() -> bool:
        return (await srv.get("/v1/version"))[1]["endpoints"]["matchup"]["token"] != old

    await wait_for(swapped, what="export 2")
    tok = (await srv.get("/v1/version"))[1]["endpoints"]["matchup"]["token"]
    spec = srv.app[SERVING].endpoints["matchup"]
    key = cache_key(bind_params(spec.params, {"champion_id": "3", "opponent_id": "5"},
                                {"role": ["mid"]}))
    answers = srv.app[SERVING].cache.answers(tok)
    assert answers is not None
    assert answers.get(with_format(key, "csv")) is not None, "the CSV answer was not warmed"
    status, headers, body = await _get(srv, path + "&format=csv")
    assert status == 200 and headers["X-Duckswap-Token"] == tok
    assert body == answers.get(with_format(key, "csv"))[0]
