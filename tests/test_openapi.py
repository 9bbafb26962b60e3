"""`GET /openapi.json`: an OpenAPI 3.1 document generated from the config, checked by a real
validator, against real answers, and by a property-based fuzzer (schemathesis) driven by it
against a real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from bench.ports import free_port
from conftest import DEMO_CONFIG, Running, small_demo
from data.generate import write_export
from engine.openapi import document
from engine.settings import parse_settings

DEMO_PATHS = {  # one request per declared endpoint of the demo
    "champion_stats": "/v1/champions/1/stats?role=mid&rank=gold&region=euw",
    "tier_list": "/v1/tierlist/mid?ranks=gold,platinum&region=euw",
    "champion_trend": "/v1/champions/1/trend?role=mid&ranks=gold",
    "champion_builds": "/v1/champions/1/builds?role=mid",
    "matchup": "/v1/matchups/1/2?role=mid",
    "champions": "/v1/champions?prefix=A",
}


@pytest.fixture
async def demo(tmp_path: Path, serve: Any) -> Running:
    return await small_demo(tmp_path, serve)


async def _get(srv: Running, path: str, **headers: str) -> tuple[int, Any, bytes]:
    return await srv.raw(path, **headers)


def _answer_schema(doc: dict[str, Any], path: str) -> Draft202012Validator:
    """The 200 schema of `path`'s operation, its `$ref`s resolvable."""
    op = doc["paths"][path]["get"]
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": doc["components"]})


async def test_the_document_validates_and_every_answer_matches_its_schema(demo: Running) -> None:
    """A real validator accepts the served document; it names every declared endpoint with
    its parameters, and a real answer of each validates against its operation's schema, whose
    rows are typed from the endpoint's SQL (DuckDB's types, without running it)."""
    status, headers, body = await _get(demo, "/openapi.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    doc = orjson.loads(body)
    validate(doc)  # raises naming what is wrong
    assert doc["openapi"] == "3.1.0"
    by_name = {op["get"]["operationId"]: (path, op["get"]) for path, op in doc["paths"].items()}
    for name, url in DEMO_PATHS.items():
        path, op = by_name[name]
        names = {p["name"] for p in op["parameters"]}
        assert "v" in names
        status, _, answer = await _get(demo, url)
        assert status == 200, (url, answer)
        parsed = orjson.loads(answer)
        assert parsed["data"], url  # rows to check against the schema
        errors = list(_answer_schema(doc, path).iter_errors(parsed))
        assert not errors, (url, errors[:3])
    stats = by_name["champion_stats"][1]
    row = stats["responses"]["200"]["content"]["application/json"]["schema"]["properties"][
        "data"]["items"]
    assert row["properties"]["win_rate"]["anyOf"][0]["type"] == "number"
    assert row["properties"]["games"]["anyOf"][0]["type"] == "integer"
    params = {p["name"]: p for p in stats["parameters"]}
    assert params["champion_id"]["in"] == "path" and params["champion_id"]["required"]
    assert params["role"]["schema"]["enum"] == ["top", "jungle", "mid", "bot", "support"]
    tier = {p["name"]: p for p in by_name["tier_list"][1]["parameters"]}
    assert tier["ranks"]["schema"]["type"] == "array" and tier["ranks"]["explode"] is False
    for route in ("/v1/version", "/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert route in doc["paths"]
    assert not any(p.startswith("/admin") for p in doc["paths"])  # no token: no admin API


async def test_the_document_has_an_etag_and_answers_304(demo: Running) -> None:
    status, headers, _ = await _get(demo, "/openapi.json")
    assert status == 200 and headers["Cache-Control"] == "public, max-age=300"
    status, again, body = await _get(demo, "/openapi.json", **{"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b"" and again["ETag"] == headers["ETag"]


def test_parameters_and_column_types_map_to_json_schema(tmp_path: Path) -> None:
    """Each parameter kind carries its type, enum values, bounds, default, list form and
    required flag; each column type maps to what the server's encoder writes."""
    settings = parse_settings({
        "source": {"url": f"file://{tmp_path}"},
        "datasets": {"t": {"key": ["k"], "columns": {
            "k": "INTEGER", "name": "VARCHAR", "score": "DECIMAL(10,3)", "day": "DATE",
            "seen_at": "TIMESTAMP", "tags": "VARCHAR[]", "pos": "STRUCT(x DOUBLE, y DOUBLE)",
            "flag": "BOOLEAN", "big": "BIGINT"}}},
        "endpoints": {"one": {
            "path": "/v1/t/{k}",
            "sql": "SELECT k, name, score, day, seen_at, tags, pos, flag, big, $w * 2 AS w2 "
                   "FROM t WHERE k = $k AND name = ANY($names) AND flag = $flag "
                   "AND regexp_matches(name, $re)",
            "row_limit": 7,
            "params": {
                "k": {"type": "int", "min": 1, "max": 99},
                "names": {"type": "enum", "values": ["a", "b"], "list": True,
                          "max_items": 3, "default": ["a"]},
                "flag": {"type": "bool", "default": True},
                "w": {"type": "float", "min": 0.5},
                "re": {"type": "string", "pattern": "[a-z]+", "max_length": 20,
                       "required": False},
            },
        }},
    }, "test.toml")
    doc = document(settings)
    validate(doc)
    op = doc["paths"]["/v1/t/{k}"]["get"]
    params = {p["name"]: p for p in op["parameters"]}
    assert params["k"] == {"name": "k", "in": "path", "required": True,
                           "schema": {"type": "integer", "format": "int64", "minimum": 1,
                                      "maximum": 99}}
    assert params["names"]["required"] is False
    assert params["names"]["schema"] == {"type": "array", "items": {"type": "string",
                                         "enum": ["a", "b"]}, "minItems": 1, "maxItems": 3,
                                         "default": ["a"]}
    assert params["flag"]["schema"] == {"type": "boolean", "default": True}
    assert params["w"]["required"] and params["w"]["schema"] == {"type": "number",
                                                                "minimum": 0.5}
    assert params["re"]["schema"] == {"type": "string", "maxLength": 20,
                                      "pattern": "^(?:[a-z]+)$"}
    assert "NULL" in params["re"]["description"]
    assert params["v"]["schema"]["pattern"] == "^[0-9a-f]{16}$"
    body = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert body["properties"]["data"]["maxItems"] == 7
    cols = {n: c["anyOf"][0] for n, c in body["properties"]["data"]["items"]["properties"]
            .items()}
    assert [cols[n]["type"] for n in ("k", "name", "score", "day", "seen_at", "tags", "pos", "flag",
                                      "big", "w2")] == [
        "integer", "string", "number", "string", "string", "array", "object", "boolean",
        "integer", "number"]
    assert cols["day"]["format"] == "date"
    assert cols["tags"]["items"]["anyOf"][0]["type"] == "string"
    assert set(cols["pos"]["properties"]) == {"x", "y"}
    assert cols["score"]["x-duckdb-type"] == "DECIMAL(10,3)"
    assert set(op["responses"]) >= {"200", "304", "307", "400", "404", "500", "503", "504"}


async def test_list_parameters_refuse_empty_items(demo: Running) -> None:
    """Found by the fuzzer: `ranks=,` was answered as an empty list. Any empty item (a bare
    `ranks=`, a trailing comma) is a 400 naming the parameter."""
    for query in ("ranks=", "ranks=,", "ranks=gold,", "ranks=gold,,silver"):
        status, _, body = await _get(demo, f"/v1/tierlist/mid?region=euw&{query}")
        assert status == 400, (query, body)
        assert orjson.loads(body)["parameter"] == "ranks"


async def test_an_integer_beyond_64_bits_is_a_400(demo: Running) -> None:
    """Found by the fuzzer: DuckDB cannot bind it, and the server answered 500."""
    for value in ("75529464304897425408", "-9223372036854775809"):
        status, _, body = await _get(demo, f"/v1/champions/3/builds?role=mid&min_games={value}")
        assert status == 400, body
        assert orjson.loads(body)["parameter"] == "min_games"
    status, _, _ = await _get(demo, "/v1/champions/3/builds?role=mid&min_games=9223372036854775807")
    assert status == 200


async def test_a_method_not_allowed_names_the_allowed_ones(demo: Running) -> None:
    """Found by the fuzzer: a 405 without `Allow` (RFC 9110 requires it)."""
    async with demo.session.post(demo.url("/v1/version")) as resp:
        assert resp.status == 405
        assert set(resp.headers["Allow"].split(", ")) >= {"GET"}


@pytest.mark.timeout(240)
def test_a_fuzzer_driven_by_the_document_finds_no_5xx_and_no_schema_break(
        tmp_path: Path) -> None:
    """schemathesis, driven by the served document, against `duckswap serve` on the small
    demo: every check it has (no 5xx, status codes, content types, headers and bodies as
    documented, invalid input refused, valid input accepted, 405s), all its phases
    (coverage, fuzzing, stateful links from `/v1/version`), 45 s of requests."""
    write_export(tmp_path / "src", 1, size="small")
    port = free_port()
    env = {**os.environ, "DUCKSWAP_SOURCE__URL": f'"file://{tmp_path / "src"}"',
           "DUCKSWAP_SERVER__DATA_DIR": f'"{tmp_path / "data"}"',
           "DUCKSWAP_SERVER__PORT": str(port), "DUCKSWAP_SERVER__WORKERS": "1"}
    with (tmp_path / "server.log").open("ab") as log:
        server = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--config",
                                   str(DEMO_CONFIG)], env=env, stdout=log, stderr=log)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/readyz", 90)
        fuzz = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run",
             f"http://127.0.0.1:{port}/openapi.json", "--checks", "all", "--max-time", "45",
             "--workers", "2", "--request-timeout", "10", "--no-color"],
            capture_output=True, text=True, timeout=180, cwd=tmp_path)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    assert fuzz.returncode == 0, fuzz.stdout[-6000:] + fuzz.stderr[-2000:]
    assert "No issues found" in fuzz.stdout, fuzz.stdout[-3000:]


def _wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered 200"
        time.sleep(0.1)  # poll with a deadline
