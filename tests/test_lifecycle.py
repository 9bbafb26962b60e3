"""An export's life after the download: the dataset checks, the admin API (rollback, pin,
unpin, reload), versions kept on disk for rollback and for a restart, crash leftovers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import (
    Running,
    metric_samples,
    replica_updater,
    seq_config,
    seq_config_file,
    wait_for,
    write_seq_export,
)
from engine.schema import DatasetSchema
from engine.settings import parse_settings
from engine.store import Replica
from loaders.build import build_file, in_key_order
from loaders.updater import Updater
from serving.app import UPDATER

TOKEN = "lifecycle-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def admin(srv: Running, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    kw.setdefault("headers", AUTH)
    async with srv.session.request(method, srv.url(path), **kw) as resp:
        return resp.status, await resp.json()


async def served_seq(srv: Running) -> int:
    status, body = await srv.get("/v1/rows")
    assert status == 200, body
    return int(body["data"][0]["export_seq"])


# -- admin: auth ----------------------------------------------------------------------------

async def test_admin_routes_do_not_exist_without_a_token(tmp_path: Path, serve: Any) -> None:
    write_seq_export(tmp_path, 1)
    srv = await serve(seq_config(tmp_path))
    await srv.wait_ready()
    for method, path in (("GET", "/admin/datasets"), ("POST", "/admin/datasets/seqdata/pin"),
                         ("POST", "/admin/reload")):
        status, body = await admin(srv, method, path)
        assert status == 404 and body["error"] == "not_found", (method, path, body)


async def test_admin_wants_the_bearer_token(tmp_path: Path, serve: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    write_seq_export(tmp_path, 1)
    srv = await serve(seq_config(tmp_path, admin_token=TOKEN))
    await srv.wait_ready()
    with caplog.at_level(logging.INFO):
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token-00"},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
            async with srv.session.get(srv.url("/admin/datasets"), headers=headers) as resp:
                body = await resp.json()
                assert resp.status == 401, headers
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert body["error"] == "unauthorized"
            status, _ = await admin(srv, "POST", "/admin/datasets/seqdata/pin", headers=headers)
            assert status == 401
        status, listing = await admin(srv, "GET", "/admin/datasets")
        assert status == 200
    (ds,) = listing["datasets"]
    assert ds["name"] == "seqdata" and ds["served"]["export_id"] == "export-000001"
    assert ds["pinned"] is None and ds["data_age_s"] >= 0
    assert "refused GET /admin/datasets" in caplog.text
    assert TOKEN not in caplog.text and "wrong-token" not in caplog.text


def test_a_short_admin_token_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="server.admin_token: must be at least 16") as err:
        seq_config(tmp_path, admin_token="short-secret")
    assert "short-secret" not in str(err.value)
    # a token of digits only is read as a TOML integer: refused, and not echoed either
    with pytest.raises(ValueError, match="server.admin_token: expected a string, got an integer") \
            as err:
        seq_config(tmp_path, admin_token=12345678901234567890)
    assert "12345678901234567890" not in str(err.value)


# -- admin: actions -------------------------------------------------------------------------

async def test_rollback_pin_unpin_and_reload(tmp_path: Path, serve: Any,
                                             caplog: pytest.LogCaptureFixture) -> None:
    write_seq_export(tmp_path, 1)
    srv = await serve(seq_config(tmp_path, admin_token=TOKEN))
    await srv.wait_export("/v1/rows", 1)
    write_seq_export(tmp_path, 2)
    await srv.wait_export("/v1/rows", 2)
    _, before = await admin(srv, "GET", "/admin/datasets/seqdata")
    assert [k["export_id"] for k in before["kept"]] == ["export-000002", "export-000001"]
    first = before["kept"][1]["version"]

    with caplog.at_level(logging.WARNING, logger="duckswap.loader"):
        status, body = await admin(srv, "POST", "/admin/datasets/seqdata/rollback")
    assert status == 200, body
    assert await served_seq(srv) == 1  # answered from the rolled-back version at once
    ds = body["dataset"]
    assert ds["served"]["version"] == first and ds["pinned"] == first
    assert ds["actions"][0]["action"] == "rollback"
    assert "admin: rollback seqdata" in caplog.text

    # Pinned: a newer export is not taken, not even on an explicit reload.
    write_seq_export(tmp_path, 3)
    status, body = await admin(srv, "POST", "/admin/datasets/seqdata/reload")
    assert status == 200 and body["loads"] == []
    assert await served_seq(srv) == 1

    status, body = await admin(srv, "POST", "/admin/datasets/seqdata/unpin")
    assert status == 200 and body["datasets"][0]["pinned"] is None
    assert await served_seq(srv) == 3  # unpin loads the newest export now
    assert [k["export_id"] for k in body["datasets"][0]["kept"]] == [
        "export-000003", "export-000001"]  # keep_versions = 2: the last two served

    # Pin the served version, then pin (serve) the other kept one by id.
    status, body = await admin(srv, "POST", "/admin/datasets/seqdata/pin")
    assert status == 200 and body["dataset"]["pinned"] == body["dataset"]["served"]["version"]
    status, body = await admin(srv, "POST", "/admin/datasets/seqdata/pin",
                               json={"version": first})
    assert status == 200 and body["dataset"]["served"]["version"] == first
    assert await served_seq(srv) == 1
    await admin(srv, "POST", "/admin/datasets/seqdata/unpin")
    assert await served_seq(srv) == 3
    _, listing = await admin(srv, "GET", "/admin/datasets/seqdata")
    assert [a["action"] for a in listing["actions"]] == [
        "unpin", "pin", "pin", "unpin", "reload", "rollback"]
    assert all(a["by"] == "127.0.0.1" for a in listing["actions"])


async def test_reload_retries_quarantined_exports_when_asked(tmp_path: Path,
                                                             serve: Any) -> None:
    write_seq_export(tmp_path, 1)
    srv = await serve(seq_config(tmp_path, admin_token=TOKEN))
    await srv.wait_export("/v1/rows", 1)
    bad = write_seq_export(tmp_path, 2, marker="")
    (bad / "part-00000.parquet").write_bytes(b"not parquet")
    (bad / "_SUCCESS").write_text("")
    updater = srv.app[UPDATER]

    async def refused() -> bool:
        return ("seqdata", "export-000002") in updater.refused

    await wait_for(refused, 20, "the refusal")
    status, body = await admin(srv, "POST", "/admin/reload")
    assert status == 200 and body["loads"] == []  # quarantined: not tried again
    status, body = await admin(srv, "POST", "/admin/reload",
                               json={"retry_quarantined": True})
    assert status == 200
    (load,) = body["loads"]
    assert load["outcome"] == "refused" and "not a readable Parquet file" in load["reason"]


@pytest.mark.parametrize(("method", "path", "kw", "status", "text"), [
    ("POST", "/admin/datasets/seqdata/rollback", {}, 409, "keeps no earlier version"),
    ("POST", "/admin/datasets/seqdata/pin", {"json": {"version": "0123456789abcdef"}}, 409,
     "does not keep version '0123456789abcdef'"),
    ("POST", "/admin/datasets/nope/pin", {}, 404, "no dataset 'nope'"),
    ("GET", "/admin/datasets/nope", {}, 404, "no dataset 'nope'"),
    ("POST", "/admin/datasets/seqdata/pin", {"data": b"{not json"}, 400, "not valid JSON"),
    ("POST", "/admin/datasets/seqdata/pin", {"json": {"versoin": "x"}}, 400,
     "unknown field 'versoin'"),
    ("POST", "/admin/datasets/seqdata/pin", {"json": {"version": 7}}, 400,
     "expected a version id string"),
    ("GET", "/admin/datasets/seqdata/pin", {}, 405, "GET is not allowed"),
])
async def test_bad_admin_requests_get_a_clear_error(tmp_path: Path, serve: Any, method: str,
                                                    path: str, kw: dict[str, Any],
                                                    status: int, text: str) -> None:
    write_seq_export(tmp_path, 1)
    srv = await serve(seq_config(tmp_path, admin_token=TOKEN))
    await srv.wait_export("/v1/rows", 1)
    got, body = await admin(srv, method, path, **kw)
    assert got == status and text in body["message"], body
    assert await served_seq(srv) == 1


# -- versions on disk: restart and crash ----------------------------------------------------

async def test_restart_serves_the_cached_version_first(tmp_path: Path, serve: Any) -> None:
    source, data = tmp_path / "src", tmp_path / "data"
    settings = seq_config(source, admin_token=TOKEN, data_dir=str(data))
    write_seq_export(source, 1)
    srv = await serve(settings)
    for seq in (1, 2, 3):
        write_seq_export(source, seq)
        await srv.wait_export("/v1/rows", seq)
    _, pointer = await srv.get("/v1/version")
    await admin(srv, "POST", "/admin/datasets/seqdata/rollback")  # pinned at export 2
    write_seq_export(source, 4)

    async def collected() -> bool:  # keep_versions: the served one and the one before
        return len(list((data / "versions").iterdir())) == 2

    await wait_for(collected, 30, "export 1's file to be deleted")
    await srv.stop()
    kept = sorted(p.name for p in (data / "versions").iterdir())
    assert len(kept) == 2

    for seq in (1, 2, 3, 4):  # the source has nothing to offer any more
        for f in (source / "seqdata" / f"export-{seq:06d}").iterdir():
            f.unlink()
    again = await serve(settings)
    await again.wait_ready(timeout=60)
    assert await served_seq(again) == 2  # cached, and still pinned
    _, listing = await admin(again, "GET", "/admin/datasets/seqdata")
    assert listing["pinned"] == listing["served"]["version"]
    await admin(again, "POST", "/admin/datasets/seqdata/pin",
                json={"version": pointer["datasets"]["seqdata"]["version"]})
    assert await served_seq(again) == 3
    _, pointer_again = await again.get("/v1/version")
    assert pointer_again["datasets"] == pointer["datasets"]  # same content-derived ids


async def test_a_config_that_names_an_export_is_the_rollback_every_replica_follows(
        tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    """`datasets.*.export`: a replica with the versions on disk (and an admin pin) and a new one
    with none are ready only once they serve the named export (older than the newest), and
    take nothing else; the admin API cannot move it; a kept one is served from the data dir; one
    the source lacks or refuses is said (and the replica serves what it kept); without the key
    the source is followed."""
    source, data, fresh = tmp_path / "src", tmp_path / "data", tmp_path / "fresh"
    for seq in (1, 2, 3):
        write_seq_export(source, seq)
    srv = await serve(seq_config(source, admin_token=TOKEN, data_dir=str(data)))
    await srv.wait_export("/v1/rows", 3)
    assert (await admin(srv, "POST", "/admin/datasets/seqdata/pin"))[0] == 200
    await srv.stop()

    named = seq_config(source, export="export-000002", admin_token=TOKEN, data_dir=str(data))
    replicas = [await serve(named), await serve(replace(named, data_dir=str(fresh)))]
    write_seq_export(source, 4)  # a newer export: not taken
    for r in replicas:
        await r.wait_ready(30)  # and at once, it serves the named export
        _, pointer = await r.get("/v1/version")
        assert pointer["datasets"]["seqdata"]["export_id"] == "export-000002"
        status, body = await admin(r, "POST", "/admin/reload")
        assert status == 200 and body["loads"] == []
        assert await served_seq(r) == 2
        _, pointer = await r.get("/v1/version")
        assert pointer["datasets"]["seqdata"]["export_id"] == "export-000002"
        for action in ("rollback", "pin", "unpin"):
            status, body = await admin(r, "POST", f"/admin/datasets/seqdata/{action}")
            assert status == 409 and "datasets.seqdata.export" in body["message"], body
        _, doc = await admin(r, "GET", "/admin/datasets/seqdata")
        assert doc["export_from_config"] == "export-000002" and doc["config_problem"] is None
        assert doc["pinned"] is None  # the admin pin the data dir held gave way to the config
        async with r.session.get(r.url("/metrics")) as resp:
            assert 'duckswap_dataset_pinned{dataset="seqdata"} 1.0' in await resp.text()
    versions = [(await r.get("/v1/version"))[1]["datasets"] for r in replicas]
    assert versions[0] == versions[1]  # the same content-derived version id on both
    for r in replicas:
        await r.stop()

    # Named again: export 3, which the data dir keeps, is served from it (no build).
    with caplog.at_level(logging.INFO, logger="duckswap"):
        srv = await serve(replace(named, datasets={"seqdata": replace(
            named.datasets["seqdata"], export="export-000003")}))
        await srv.wait_export("/v1/rows", 3)
    assert "serving cached seqdata/export-000003 before the source answers" in caplog.text
    assert "built seqdata/export-000003" not in caplog.text
    await srv.stop()

    # An export the source does not hold: said once, at ERROR, and the served data stays.
    caplog.clear()
    missing = replace(named, datasets={"seqdata": replace(named.datasets["seqdata"],
                                                          export="export-000009")})
    with caplog.at_level(logging.ERROR, logger="duckswap"):
        srv = await serve(missing)
        await srv.wait_ready()
        status, _ = await admin(srv, "POST", "/admin/reload")
    assert status == 200 and await served_seq(srv) == 3
    assert caplog.text.count("the config names export export-000009 for seqdata") == 1
    _, doc = await admin(srv, "GET", "/admin/datasets/seqdata")
    assert doc["config_problem"] == "the source holds no complete export export-000009"
    await srv.stop()

    # An export the server refuses: the same, with the reason.
    bad = write_seq_export(source, 5)
    (bad / "part-00000.parquet").write_bytes(b"not parquet")
    refused = replace(named, datasets={"seqdata": replace(named.datasets["seqdata"],
                                                          export="export-000005")})
    srv = await serve(refused)

    async def said() -> bool:
        doc = (await admin(srv, "GET", "/admin/datasets/seqdata"))[1]
        return bool(doc["config_problem"]) and (await srv.get("/readyz"))[0] == 200

    await wait_for(said, 30, "the refusal of the named export")
    _, doc = await admin(srv, "GET", "/admin/datasets/seqdata")
    assert doc["config_problem"].startswith("export export-000005 of seqdata was refused: ")
    assert await served_seq(srv) == 3
    await srv.stop()

    # Without the key: the source again, its newest valid export.
    srv = await serve(seq_config(source, data_dir=str(data)))
    await srv.wait_export("/v1/rows", 4)


async def test_the_export_age_is_the_markers_and_survives_a_restart(tmp_path: Path,
                                                                    serve: Any) -> None:
    """`duckswap_export_age_seconds` counts from when the export was complete in the source
    (its marker's time), not from when this server loaded it: a restart does not reset it,
    so a stale-data alert holds across a fleet's restarts."""
    source, data = tmp_path / "src", tmp_path / "data"
    folder = write_seq_export(source, 1)
    an_hour_ago = time.time() - 3600
    os.utime(folder / "_SUCCESS", (an_hour_ago, an_hour_ago))
    settings = seq_config(source, admin_token=TOKEN, data_dir=str(data))

    async def ages(srv: Running) -> tuple[float, float]:
        return ((await metric_samples(srv, "duckswap_export_age_seconds"))[("seqdata",)],
                (await metric_samples(srv, "duckswap_data_age_seconds"))[("seqdata",)])

    for _ in range(2):  # the first start loads the export, the second serves it from disk
        srv = await serve(settings)
        await srv.wait_export("/v1/rows", 1)
        export_age, data_age = await ages(srv)
        assert 3600 <= export_age < 3600 + 120, export_age
        assert data_age < 120
        _, doc = await admin(srv, "GET", "/admin/datasets/seqdata")
        assert 3600 <= doc["export_age_s"] < 3600 + 120
        assert doc["served"]["written_at"].startswith(
            time.strftime("%Y-%m-%dT%H", time.gmtime(an_hour_ago)))
        await srv.stop()

    # A state.json written before export ages were kept: learnt from the next listing.
    state = json.loads((data / "state.json").read_text())
    for ds in state["datasets"].values():
        for version in ds["versions"]:
            del version["written_at"]
    (data / "state.json").write_text(json.dumps(state))
    srv = await serve(settings)
    await srv.wait_ready()

    async def learnt() -> bool:
        try:
            return 3600 <= (await ages(srv))[0] < 3600 + 120
        except KeyError:  # no export age yet: not listed yet
            return False

    await wait_for(learnt, 10, "the export age of a version from an older state.json")


async def test_startup_removes_what_a_crash_left(tmp_path: Path, serve: Any) -> None:
    source, data = tmp_path / "src", tmp_path / "data"
    settings = seq_config(source, data_dir=str(data))
    write_seq_export(source, 1)
    srv = await serve(settings)
    await srv.wait_export("/v1/rows", 1)
    await srv.stop()
    # What kill -9 at each step leaves: a download, a build, a state file being written.
    (data / "staging" / "duckswap-seqdata-export-000002-999").mkdir(parents=True)
    (data / "staging" / "duckswap-seqdata-export-000002-999" / "part-00000.parquet.part"
     ).write_bytes(b"half")
    (data / "versions" / "seqdata-0123456789abcdef-999-7.duckdb").write_bytes(b"half")
    (data / "versions" / "seqdata-0123456789abcdef-999-7.duckdb.wal").write_bytes(b"")
    (data / "state.tmp").write_text('{"format": 1, "datas')
    kept = {p.name for p in (data / "versions").iterdir() if "-999-" not in p.name}
    srv = await serve(settings)
    await srv.wait_export("/v1/rows", 1)
    await srv.stop()  # a state save in flight writes state.tmp too: let it finish
    assert list((data / "staging").iterdir()) == []
    assert {p.name for p in (data / "versions").iterdir()} == kept
    assert not (data / "state.tmp").exists()


async def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path: Path,
                                                               serve: Any) -> None:
    settings = seq_config(tmp_path, data_dir=str(tmp_path / "data"))
    await serve(settings)
    with pytest.raises(RuntimeError, match="in use by another server"):
        await serve(settings)


# -- dataset checks -------------------------------------------------------------------------

def _table(**columns: Any) -> pa.Table:
    return pa.table(columns)


def _export(root: Path, seq: int, table: pa.Table) -> None:
    folder = root / "stats" / f"export-{seq:06d}"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")
    (folder / "_SUCCESS").write_text("")


GOOD = {"id": pa.array([1, 2, 3], pa.int32()), "n": pa.array([10, 20, 30], pa.int64())}


@pytest.mark.parametrize(("options", "columns", "reason"), [
    ({"not_null": ["n"]}, {**GOOD, "n": pa.array([10, None, 30], pa.int64())},
     "column 'n' has 1 NULL values"),
    ({"unique_key": ["id"]}, {**GOOD, "id": pa.array([1, 2, 2], pa.int32())},
     "unique_key (id) is not unique: 2 rows have id=2"),
    ({"extra_columns": "refuse"}, {**GOOD, "x": pa.array(["a", "b", "c"])},
     "column 'x' is not declared (extra_columns = refuse)"),
    ({}, {**GOOD, "id": pa.array([1, 2, 3], pa.int64())}, "column 'id' is BIGINT, declared "
     "INTEGER"),
    ({}, {"id": pa.array([], pa.int32()), "n": pa.array([], pa.int64())},
     "export has no rows (allow_empty is false)"),
    ({"max_export_mb": 0.0001}, GOOD, "over max_export_mb"),
])
def test_dataset_checks_refuse(tmp_path: Path, options: dict[str, Any],
                               columns: dict[str, Any], reason: str) -> None:
    updater, store = _updater(tmp_path, options)
    _export(tmp_path, 1, _table(**columns))
    (event,) = updater.refresh()
    assert not event.ok and reason in event.reason, event.reason
    assert store.current.versions == {}
    store.close()


@pytest.mark.parametrize(("options", "columns", "served"), [
    ({"extra_columns": "keep"}, {**GOOD, "x": pa.array(["a", "b", "c"])}, ["id", "n", "x"]),
    ({"extra_columns": "drop"}, {**GOOD, "x": pa.array(["a", "b", "c"])}, ["id", "n"]),
    ({"allow_empty": True}, {"id": pa.array([], pa.int32()), "n": pa.array([], pa.int64())},
     ["id", "n"]),
    ({}, {**GOOD, "n": pa.array([10, 20, 30], pa.int32())}, ["id", "n"]),  # widens to BIGINT
    ({"not_null": ["n"], "unique_key": ["id"]}, GOOD, ["id", "n"]),
])
def test_dataset_checks_accept(tmp_path: Path, options: dict[str, Any],
                               columns: dict[str, Any], served: list[str]) -> None:
    updater, store = _updater(tmp_path, options)
    _export(tmp_path, 1, _table(**columns))
    (event,) = updater.refresh()
    assert event.ok, event.reason
    cur = store.cursor()
    cur.execute(f"SET search_path = '{store.current.schema}'")
    rel = cur.execute("SELECT * FROM stats")
    assert [d[0] for d in rel.description] == served
    assert len(rel.fetchall()) == len(next(iter(columns.values())))
    assert dict(zip(served, [str(t) for t in cur.sql("SELECT * FROM stats").types],
                    strict=True))["n"] == "BIGINT"
    store.close()


def _updater(root: Path, options: dict[str, Any]) -> tuple[Updater, Replica]:
    settings = parse_settings({
        "source": {"url": f"file://{root}"},
        "datasets": {"stats": {"key": ["id"], "columns": {"id": "INTEGER", "n": "BIGINT"},
                               **options}},
        "endpoints": {"one": {"path": "/v1/one", "datasets": ["stats"],
                              "sql": "SELECT * FROM stats"}},
    })
    updater, store, _ = replica_updater(root, settings.datasets)
    return updater, store


def test_version_files_beyond_keep_versions_are_deleted(tmp_path: Path) -> None:
    updater, store, publisher = replica_updater(tmp_path, seq_config(tmp_path).datasets,
                                                keep_versions=3)
    for seq in range(1, 7):
        write_seq_export(tmp_path, seq)
        (event,) = updater.refresh()
        assert event.ok
        publisher.collect()
    files = sorted(p for p in store.data_dir.iterdir() if p.suffix == ".duckdb")
    assert len(files) == 3 and store.held_versions() == 1
    assert [r.export_id for r in updater.state["seqdata"].versions] == [
        "export-000006", "export-000005", "export-000004"]
    assert {p.name for p in files} == {r.file for r in updater.state["seqdata"].versions}
    store.close()


def test_an_unusable_data_dir_stops_startup_with_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = seq_config_file(tmp_path, blocker / "data")
    done = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--config",
                           str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{config}: server.data_dir: data dir {blocker / 'data'} cannot be used" \
        in done.stderr
    assert "Traceback" not in done.stderr
    # set from the environment: the error names the variable
    env = {**os.environ, "DUCKSWAP_SERVER__DATA_DIR": str(blocker / "other")}
    done = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--config",
                           str(config)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2
    assert (f"DUCKSWAP_SERVER__DATA_DIR: server.data_dir: data dir {blocker / 'other'} "
            "cannot be used") in done.stderr, done.stderr


def _parts(folder: Path, parts: list[list[tuple[Any, ...]]]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, rows in enumerate(parts):
        path = folder / f"part-{i:05d}.parquet"
        cols = list(zip(*rows, strict=True))
        pq.write_table(pa.table({"g": pa.array(cols[0], pa.string()),
                                 "k": pa.array(cols[1], pa.int64()),
                                 "v": pa.array(cols[2], pa.int64())}), path)
        files.append(str(path))
    return files


@pytest.mark.parametrize(("parts", "ordered"), [
    ([[("a", 1, 0), ("a", 2, 1)], [("a", 2, 2), ("b", 0, 3)]], True),  # ties allowed
    ([[("a", 2, 0), ("a", 1, 1)], [("b", 0, 2)]], False),  # out of order inside a file
    ([[("b", 0, 0)], [("a", 1, 1)]], False),  # each file sorted, the files not
    ([[("a", 1, 0), ("a", None, 1)], [("b", 0, 2)]], False),  # a NULL key: no verdict
])
def test_an_export_already_in_key_order_is_built_without_a_sort(
        tmp_path: Path, parts: list[list[tuple[Any, ...]]], ordered: bool) -> None:
    """Either way the version's table comes out in key order (what the zone maps need)."""
    schema = DatasetSchema("t", ("g", "k"), {"g": "VARCHAR", "k": "BIGINT", "v": "BIGINT"})
    files = _parts(tmp_path / "export", parts)
    con = duckdb.connect()
    assert in_key_order(con, files, schema) is ordered
    con.close()
    build_file(files, schema, str(tmp_path / "v.duckdb"), 2)
    con = duckdb.connect(str(tmp_path / "v.duckdb"), read_only=True)
    rows = con.execute("SELECT g, k FROM data").fetchall()
    con.close()
    keys = [(r[0], r[1]) for p in parts for r in p]
    assert rows == sorted(keys, key=lambda r: (r[0], r[1] is None, r[1] or 0))  # NULLs last
