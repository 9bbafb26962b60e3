"""The swap contract, black box: time never runs backwards for a client, whatever it reads."""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import Running, metric_samples, seq_config, wait_for, write_seq_export
from engine.config import ConfigError
from engine.settings import Settings, parse_settings
from engine.sqlcheck import check_sql
from loaders.warm import WarmPolicy
from serving.app import UPDATER, WARMER
from serving.state import SERVING, STORE

KEYS = 4000  # rows of each export, one key each: far more than a client reads between swaps


def keyed_config(root: Path, row_limit: int = 1, **server: object) -> Settings:
    """The default server settings; one endpoint per key, every key declared for the warm
    (with `row_limit` 1 in batched queries; above it, one query per key: a slow warm)."""
    return parse_settings({
        "server": dict(server),
        "source": {"url": f"file://{root}", "debounce_ms": 20},
        "datasets": {"seqdata": {
            "key": ["k"],
            "columns": {"k": "INTEGER", "export_seq": "INTEGER", "label": "VARCHAR"},
        }},
        "endpoints": {"row": {
            "path": "/v1/rows/{k}",
            "datasets": ["seqdata"],
            "sql": "SELECT k, export_seq, label FROM seqdata WHERE k = $k",
            "row_limit": row_limit,
            "warm_sql": "SELECT k FROM seqdata",
            "params": {"k": {"type": "int", "min": 0}},
        }},
    }, "test.toml")


async def test_no_client_sees_an_older_export_after_a_newer_one(tmp_path: Path, serve) -> None:
    """8 keep-alive clients each read keys they have not read before while 20 exports are
    published: every answer is whole, and none is older than one that client already had."""
    write_seq_export(tmp_path, 1, rows=KEYS)
    srv: Running = await serve(keyed_config(tmp_path))
    await srv.wait_ready()
    stop = asyncio.Event()
    failed: list[str] = []
    backwards: list[str] = []
    answered = [0] * 8

    async def client(i: int) -> None:
        keys = list(range(KEYS))
        random.Random(i).shuffle(keys)
        last, n = 0, 0
        while not stop.is_set():
            k = keys[n % KEYS]
            n += 1
            async with srv.session.get(srv.url(f"/v1/rows/{k}")) as resp:
                if resp.status != 200:
                    failed.append(f"client {i}: HTTP {resp.status} {await resp.text()}")
                    continue
                body = await resp.json()
            rows = body["data"]
            if len(rows) != 1 or rows[0]["k"] != k:
                failed.append(f"client {i}: key {k} answered {rows}")
                continue
            seq = rows[0]["export_seq"]
            if seq < last:
                backwards.append(f"client {i}: key {k} from export {seq} after export {last}")
            last = max(last, seq)
            answered[i] += 1

    clients = [asyncio.create_task(client(i)) for i in range(8)]
    for seq in range(2, 22):  # 20 swaps
        await asyncio.to_thread(write_seq_export, tmp_path, seq, KEYS)

        async def published(seq: int = seq) -> bool:
            status, body = await srv.get("/v1/rows/0")
            return status == 200 and body["data"][0]["export_seq"] == seq

        await wait_for(published, 60, f"export {seq} to be served")
        await asyncio.sleep(0.3)  # the clients read on the new export a while
    stop.set()
    await asyncio.gather(*clients)
    assert failed == []
    assert backwards == [], f"{len(backwards)} answers went back in time: {backwards[:5]}"
    assert all(n > 0 for n in answered)


# -- the newest valid export wins ---------------------------------------------------------

TOKEN = "contract-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_bad_export(root: Path, seq: int) -> Path:
    """An export whose one part is not Parquet: refused by every check."""
    folder = root / "seqdata" / f"export-{seq:06d}"
    folder.mkdir(parents=True)
    (folder / "part-00000.parquet").write_bytes(b"not parquet, export %d" % seq)
    (folder / "_SUCCESS").write_text("")
    return folder


async def admin(srv: Running, method: str, path: str) -> tuple[int, Any]:
    async with srv.session.request(method, srv.url(path), headers=AUTH) as resp:
        return resp.status, await resp.json()


async def test_the_newest_valid_export_wins_over_refused_ones(
        tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A good export and five bad ones after it, all arriving at once: each bad one is
    refused with its reason (log, admin API, metrics), and the good one is served. After a
    rollback, unpin returns to it, the newest valid export, and a good export after them is
    served."""
    caplog.set_level(logging.ERROR, logger="duckswap.loader")
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path, admin_token=TOKEN))
    await srv.wait_export("/v1/rows", 1)
    staged = tmp_path / "staged"
    write_seq_export(staged, 2)
    for seq in range(3, 8):
        write_bad_export(staged, seq)
    for folder in sorted((staged / "seqdata").iterdir()):  # each folder appears whole
        folder.rename(tmp_path / "seqdata" / folder.name)
    await srv.wait_export("/v1/rows", 2)
    bad = [f"export-{seq:06d}" for seq in range(3, 8)]

    async def all_refused() -> bool:
        return all(("seqdata", e) in srv.app[UPDATER].refused for e in bad)

    await wait_for(all_refused, 30, "every bad export to be refused")
    status, doc = await admin(srv, "GET", "/admin/datasets/seqdata")
    assert status == 200
    assert sorted(q["export_id"] for q in doc["quarantined"]) == bad
    assert all("not a readable Parquet file" in q["reason"] for q in doc["quarantined"])
    for export in bad:
        assert f"refused export seqdata/{export}" in caplog.text
    loads = await metric_samples(srv, "duckswap_loads_total")
    assert loads[("seqdata", "refused")] == 5
    assert (await metric_samples(srv, "duckswap_refused_exports"))[("seqdata",)] == 5

    status, body = await admin(srv, "POST", "/admin/datasets/seqdata/rollback")
    assert status == 200 and await served_seq(srv) == 1
    status, body = await admin(srv, "POST", "/admin/datasets/seqdata/unpin")
    assert status == 200
    assert [(e["export_id"], e["outcome"]) for e in body["loads"]] == [
        ("export-000002", "loaded")]
    assert await served_seq(srv) == 2
    write_seq_export(tmp_path, 8)
    await srv.wait_export("/v1/rows", 8)


async def served_seq(srv: Running) -> int:
    status, body = await srv.get("/v1/rows")
    assert status == 200, body
    return int(body["data"][0]["export_seq"])


# -- runs published whole -------------------------------------------------------------------

def write_run(root: Path, dataset: str, seq: int, bad: bool = False) -> None:
    folder = root / dataset / f"export-{seq:06d}"
    folder.mkdir(parents=True)
    if bad:
        (folder / "part-00000.parquet").write_bytes(b"not parquet")
    else:
        table = pa.table({"k": pa.array(range(10), pa.int32()),
                          f"{dataset}_seq": pa.array([seq] * 10, pa.int32())})
        pq.write_table(table, folder / "part-00000.parquet")
    (folder / "_SUCCESS").write_text("")


def group_config(root: Path, incomplete_seconds: float = 300) -> Settings:
    return parse_settings({
        "server": {"admin_token": TOKEN},
        "source": {"url": f"file://{root}", "debounce_ms": 20},
        "datasets": {
            "alpha": {"key": ["k"], "columns": {"k": "INTEGER", "alpha_seq": "INTEGER"}},
            "beta": {"key": ["k"], "columns": {"k": "INTEGER", "beta_seq": "INTEGER"}},
        },
        "groups": {"run": {"datasets": ["alpha", "beta"],
                           "incomplete_seconds": incomplete_seconds}},
        "endpoints": {"pair": {
            "path": "/v1/pair",
            "datasets": ["alpha", "beta"],
            "sql": "SELECT l.alpha_seq, r.beta_seq FROM alpha l JOIN beta r USING (k) "
                   "WHERE k = 0",
        }},
    }, "test.toml")


async def test_a_run_is_published_whole_or_not_at_all(
        tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A group's run is published as one Snapshot once every member has a complete export
    of it; a run incomplete past its time is reported and never published; a newer complete
    run is; a run with one bad member is not published at all."""
    caplog.set_level(logging.WARNING, logger="duckswap.loader")
    for name in ("alpha", "beta"):
        write_run(tmp_path, name, 1)
    srv: Running = await serve(group_config(tmp_path, incomplete_seconds=0.5))
    updater = srv.app[UPDATER]

    async def pair() -> tuple[int, int]:
        status, body = await srv.get("/v1/pair")
        assert status == 200, body
        return body["data"][0]["alpha_seq"], body["data"][0]["beta_seq"]

    await srv.wait_ready()
    assert await pair() == (1, 1)
    write_run(tmp_path, "alpha", 2)

    async def overdue() -> bool:
        return ("run", "export-000002") in updater.overdue

    await wait_for(overdue, 30, "run 2 to be reported incomplete")
    assert await pair() == (1, 1)  # never half a run
    assert "run export-000002 of group run is still incomplete" in caplog.text
    status, doc = await admin(srv, "GET", "/admin/datasets")
    assert status == 200
    (late,) = doc["incomplete_runs"]
    assert (late["export_id"], late["complete"], late["missing"], late["overdue"]) == (
        "export-000002", ["alpha"], ["beta"], True)
    assert (await metric_samples(srv, "duckswap_incomplete_runs"))[("run",)] == 1

    for name in ("alpha", "beta"):  # a newer complete run goes past the incomplete one
        write_run(tmp_path, name, 3)

    async def published(seqs: tuple[int, int]) -> bool:
        return await pair() == seqs

    await wait_for(lambda: published((3, 3)), 30, "run 3")
    assert updater.pending_runs == {} and updater.overdue == set()
    assert (await metric_samples(srv, "duckswap_incomplete_runs"))[("run",)] == 0
    snaps = {srv.app[STORE].current.versions[n].export_id for n in ("alpha", "beta")}
    assert snaps == {"export-000003"}

    write_run(tmp_path, "alpha", 4)
    write_run(tmp_path, "beta", 4, bad=True)

    async def refused() -> bool:
        return ("beta", "export-000004") in updater.refused

    await wait_for(refused, 30, "run 4's bad member to be refused")
    held = [e for e in updater.history if e.dataset == "alpha" and e.export_id == "export-000004"]
    assert [e.outcome for e in held] == ["held"]
    assert "beta: " in held[0].reason and "not a readable Parquet file" in held[0].reason
    assert await pair() == (3, 3)
    for name in ("alpha", "beta"):
        write_run(tmp_path, name, 5)
    await wait_for(lambda: published((5, 5)), 30, "run 5")


async def test_a_rollback_moves_the_whole_run(tmp_path: Path, serve: Any) -> None:
    """Rolling back, pinning or unpinning one member of a group moves every member: an
    endpoint joining two never serves two runs at once."""
    for name in ("alpha", "beta"):
        write_run(tmp_path, name, 1)
    srv: Running = await serve(group_config(tmp_path))

    async def pair() -> tuple[int, int]:
        status, body = await srv.get("/v1/pair")
        assert status == 200, body
        return body["data"][0]["alpha_seq"], body["data"][0]["beta_seq"]

    await srv.wait_ready()
    for name in ("alpha", "beta"):
        write_run(tmp_path, name, 2)

    async def second() -> bool:
        return await pair() == (2, 2)

    await wait_for(second, 30, "run 2")
    status, body = await admin(srv, "POST", "/admin/datasets/alpha/rollback")
    assert status == 200, body
    assert await pair() == (1, 1)
    for name in ("alpha", "beta"):
        status, doc = await admin(srv, "GET", f"/admin/datasets/{name}")
        assert doc["served"]["export_id"] == "export-000001"
        assert doc["pinned"] == doc["served"]["version"]
    status, body = await admin(srv, "POST", "/admin/datasets/beta/unpin")
    assert status == 200, body
    assert await pair() == (2, 2)
    for name in ("alpha", "beta"):
        assert (await admin(srv, "GET", f"/admin/datasets/{name}"))[1]["pinned"] is None


def test_a_group_names_declared_datasets_once() -> None:
    raw = {"source": {"url": "file:///x"},
           "datasets": {"a": {"key": ["k"], "columns": {"k": "INTEGER"}}},
           "endpoints": {}}
    with pytest.raises(ConfigError, match=r"groups.g.datasets: no dataset 'b' is declared"):
        parse_settings({**raw, "groups": {"g": {"datasets": ["a", "b"]}}})
    with pytest.raises(ConfigError, match=r"groups.h.datasets: dataset 'a' is already in "
                                          r"group 'g'"):
        parse_settings({**raw, "groups": {"g": {"datasets": ["a"]}, "h": {"datasets": ["a"]}}})


# -- loads never wait for a warm ------------------------------------------------------------

async def test_a_new_export_cuts_the_after_publish_warm_short(tmp_path: Path,
                                                              serve: Any) -> None:
    """An export that completes while the version before it is still being warmed after its
    publish starts loading at once: that warm is cut short. An export that is then refused
    replaces nothing, and the cut warm goes on where it stopped."""
    keys = 20000  # declared keys, answered one query each: a long after-publish warm
    write_seq_export(tmp_path, 1, rows=keys)
    srv: Running = await serve(keyed_config(tmp_path, 1000),
                               WarmPolicy(tail_seconds=120, busy_seconds=0))
    warmer, store, serving = srv.app[WARMER], srv.app[STORE], srv.app[SERVING]

    async def tail_running() -> bool:
        return warmer._stop is not None

    await wait_for(tail_running, 30, "the after-publish warm of export 1")
    write_seq_export(tmp_path, 2, rows=keys)

    async def published() -> bool:
        status, body = await srv.get("/v1/rows/0")
        return status == 200 and body["data"][0]["export_seq"] == 2

    await wait_for(published, 60, "export 2")
    cut = [e for e in srv.app[UPDATER].history if e.export_id == "export-000002"]
    assert [e.outcome for e in cut] == ["loaded"]
    first = warmer.last_tail
    assert first is not None and first.stopped and first.skipped > 0

    await wait_for(tail_running, 30, "the after-publish warm of export 2")
    write_bad_export(tmp_path, 3)

    async def refused() -> bool:
        return ("seqdata", "export-000003") in srv.app[UPDATER].refused

    await wait_for(refused, 30, "export 3 to be refused")
    token = serving.tokens(store.current)["row"]

    async def all_warmed() -> bool:  # resumed: every declared key answered in the end
        return len(serving.cache.answers(token) or ()) >= keys

    await wait_for(all_warmed, 120, "the cut warm of export 2 to go on")
    assert store.current.versions["seqdata"].export_id == "export-000002"


# -- no silent failures -------------------------------------------------------------------

async def test_a_query_that_fails_at_run_time_is_logged_counted_and_named(
        tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="duckswap.server")
    write_seq_export(tmp_path, 1)
    settings = parse_settings({
        "source": {"url": f"file://{tmp_path}"},
        "datasets": {"seqdata": {"key": ["k"], "columns": {
            "k": "INTEGER", "export_seq": "INTEGER", "label": "VARCHAR"}}},
        "endpoints": {"bad": {  # every label is text: the cast fails on every real row
            "path": "/v1/bad", "warm": False,
            "sql": "SELECT k FROM seqdata WHERE label::INTEGER = $n",
            "params": {"n": {"type": "int"}}}},
    }, "test.toml")
    srv: Running = await serve(settings)
    await srv.wait_ready()
    status, body = await srv.get("/v1/bad?n=3")
    assert status == 500
    assert body == {"error": "query_failed", "status": 500, "endpoint": "bad",
                    "message": "query failed: ConversionException"}
    assert "query of endpoint bad failed with n=3: Conversion Error" in caplog.text
    assert "row-0-of-1" in caplog.text  # DuckDB's message, in the log only
    errors = await metric_samples(srv, "duckswap_query_errors_total")
    assert errors == {("bad", "ConversionException"): 1}


def test_check_config_refuses_a_parameter_that_cannot_bind_where_it_is_used() -> None:
    raw = {"source": {"url": "file:///x"},
           "datasets": {"d": {"key": ["k"], "columns": {"k": "INTEGER"}}},
           "endpoints": {"e": {"path": "/e", "sql": "SELECT k FROM d WHERE k = $name",
                               "params": {"name": {"type": "string"}}}}}
    with pytest.raises(ConfigError) as info:
        check_sql(parse_settings(raw, "app.toml"))
    assert info.value.key == "endpoints.e.sql"
    assert "$name = 'x'" in info.value.problem and "Conversion Error" in info.value.problem
    raw["endpoints"]["e"]["params"]["name"]["type"] = "int"
    check_sql(parse_settings(raw, "app.toml"))


async def test_a_missing_source_folder_is_said_at_start_and_waited_for(
        tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The folder is not created behind the user's back: the start warns, /readyz and the
    admin API say why nothing is served, and once it appears its exports are served."""
    caplog.set_level(logging.INFO, logger="duckswap")
    root = tmp_path / "not-yet"
    srv: Running = await serve(seq_config(root, admin_token=TOKEN))
    assert f"source folder {root} does not exist" in caplog.text
    assert not root.exists()
    problem = f"source folder {root} does not exist"

    async def said() -> bool:
        status, body = await srv.get("/readyz")
        return status == 503 and body.get("source_problem") == problem

    await wait_for(said, 10, "/readyz to name the missing folder")
    _, doc = await admin(srv, "GET", "/admin/datasets")
    assert doc["source"]["problem"] == problem
    write_seq_export(root, 1)
    await srv.wait_export("/v1/rows", 1)
    _, doc = await admin(srv, "GET", "/admin/datasets")
    assert doc["source"]["problem"] is None


async def test_an_export_without_a_marker_is_shown_as_pending(
        tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="duckswap.loader")
    write_seq_export(tmp_path, 1, marker="")
    srv: Running = await serve(seq_config(tmp_path, admin_token=TOKEN))

    async def pending() -> bool:
        status, body = await srv.get("/readyz")
        return status == 503 and body.get("pending") == {"seqdata": ["export-000001"]}

    await wait_for(pending, 10, "/readyz to show the pending export")
    for _ in range(3):  # listed again and again: logged once
        status, body = await admin(srv, "POST", "/admin/reload")
        assert status == 200 and body["loads"] == []
    (entry,) = body["datasets"][0]["pending"]
    assert entry["export_id"] == "export-000001" and 0 <= entry["age_s"] < 60
    assert caplog.text.count("export seqdata/export-000001 has files but no _SUCCESS") == 1
    (tmp_path / "seqdata" / "export-000001" / "_SUCCESS").write_text("")
    await srv.wait_export("/v1/rows", 1)
    _, doc = await admin(srv, "GET", "/admin/datasets/seqdata")
    assert doc["pending"] == []


async def test_the_version_pointer_lists_pending_exports_while_they_are(
        tmp_path: Path, serve: Any) -> None:
    """`/v1/version` names each export being written (parts, no marker) with when its first
    file was written, beside the served versions, and drops it once it is loaded."""
    write_seq_export(tmp_path, 1)
    srv: Running = await serve(seq_config(tmp_path))
    await srv.wait_export("/v1/rows", 1)
    status, doc = await srv.get("/v1/version")
    assert status == 200 and "pending" not in doc
    before = time.time()
    write_seq_export(tmp_path, 2, marker="")

    async def listed() -> bool:
        return "pending" in (await srv.get("/v1/version"))[1]

    await wait_for(listed, 10, "/v1/version to list the pending export")
    _, doc = await srv.get("/v1/version")
    (entry,) = doc["pending"]["seqdata"]
    assert entry["export_id"] == "export-000002"
    since = datetime.datetime.fromisoformat(entry["since"]).timestamp()
    assert before - 2 <= since <= time.time()
    assert doc["datasets"]["seqdata"]["export_id"] == "export-000001"
    (tmp_path / "seqdata" / "export-000002" / "_SUCCESS").write_text("")
    await srv.wait_export("/v1/rows", 2)

    async def dropped() -> bool:
        return "pending" not in (await srv.get("/v1/version"))[1]

    await wait_for(dropped, 10, "/v1/version to drop the loaded export")


# -- least privilege for endpoint SQL --------------------------------------------------------

ESCAPES = {
    "a file": "SELECT content FROM read_text('{state}')",
    "a URL": "SELECT * FROM read_csv('https://example.com/stats.csv')",
    "ATTACH": "ATTACH '{state}.db' AS other",
    "SET": "SET enable_external_access = true",
}


@pytest.mark.parametrize("what", sorted(ESCAPES))
def test_check_config_refuses_endpoint_sql_that_reads_outside_its_datasets(
        tmp_path: Path, what: str) -> None:
    sql = ESCAPES[what].format(state=tmp_path / "state.json")
    raw = {"source": {"url": "file:///x"},
           "datasets": {"d": {"key": ["k"], "columns": {"k": "INTEGER"}}},
           "endpoints": {"e": {"path": "/e", "sql": sql, "datasets": ["d"]}}}
    with pytest.raises(ConfigError) as info:
        check_sql(parse_settings(raw, "app.toml"))
    assert info.value.key == "endpoints.e.sql"
    expected = {"a file": "reads with read_text()", "a URL": "reads with read_csv()",
                "ATTACH": "must be a SELECT statement", "SET": "must be a SELECT statement"}
    assert expected[what] in info.value.problem


def _refused(con: Any, state: Path) -> None:
    """Every escape, run as a statement of its own on `con`, is refused by DuckDB."""
    import duckdb

    for what, sql in ESCAPES.items():
        with pytest.raises(duckdb.Error) as info:
            con.execute(sql.format(state=state)).fetchall()
        assert isinstance(info.value, duckdb.PermissionException | duckdb.InvalidInputException), (
            what, info.value)


def test_a_workers_connections_are_locked_down(tmp_path: Path) -> None:
    """A worker's Replica cursors (requests) refuse files, URLs, ATTACH and turning external
    access back on."""
    from engine.store import Replica

    state = tmp_path / "state.json"
    state.write_text('{"secret": true}')
    (tmp_path / "versions").mkdir()
    store = Replica(tmp_path / "versions")
    try:
        _refused(store.cursor(), state)
    finally:
        store.close()


async def test_endpoint_sql_that_got_past_the_check_is_refused_at_run_time(
        tmp_path: Path, serve: Any) -> None:
    """An endpoint reading the server's own state file (its SQL swapped in after the check)
    answers 500 and serves nothing of it, nor does the warm."""
    from dataclasses import replace

    write_seq_export(tmp_path, 1)
    settings = seq_config(tmp_path, data_dir=str(tmp_path / "data"))
    spec = settings.endpoints["rows"]
    sneaky = replace(spec, sql=f"SELECT content AS label, 1 AS k, 1 AS export_seq, $min_k AS m "
                               f"FROM read_text('{tmp_path / 'data' / 'state.json'}')")
    srv: Running = await serve(replace(settings, endpoints={"rows": sneaky}))

    async def loaded() -> bool:
        return srv.app[STORE].current.versions.get("seqdata") is not None

    await wait_for(loaded, 30, "export 1")
    async with srv.session.get(srv.url("/v1/rows?min_k=1")) as resp:
        text = await resp.text()
    assert resp.status == 500 and "PermissionException" in text
    assert "seqdata" not in text and "versions" not in text


def test_a_build_connection_reads_its_exports_files_and_nothing_else(tmp_path: Path) -> None:
    """`lock_down` as `build_file` calls it: the export's own files (and the version file's
    folder) are readable, another export's are not, and nothing can turn that back."""
    import duckdb

    from engine.sql import lock_down

    parts = sorted(str(p) for p in write_seq_export(tmp_path, 1).glob("part-*.parquet"))
    other = sorted(str(p) for p in write_seq_export(tmp_path, 2).glob("part-*.parquet"))
    (tmp_path / "versions").mkdir()
    con = duckdb.connect(str(tmp_path / "versions" / "v.duckdb"))
    try:
        lock_down(con, [tmp_path / "versions"], parts)
        row = con.execute("SELECT count(*) FROM read_parquet($f)", {"f": parts}).fetchone()
        assert row == (50,)
        with pytest.raises(duckdb.PermissionException):
            con.execute("SELECT count(*) FROM read_parquet($f)", {"f": other})
        _refused(con, tmp_path / "state.json")
    finally:
        con.close()
