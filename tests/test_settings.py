"""Config: errors name the file and the key; check-config prepares SQL; README documents keys."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from bench.ports import free_port
from conftest import DEMO_CONFIG, REPO, seq_config_file, write_seq_export
from engine.config import ConfigError
from engine.settings import (
    SETTING_KEYS,
    cgroup_cpu_quota,
    load_settings,
    parse_settings,
    reference_table,
    usable_cpus,
)
from engine.sqlcheck import check_sql

BASE: dict[str, Any] = {
    "source": {"url": "file:///tmp/x"},
    "datasets": {"stats": {"key": ["id"], "columns": {"id": "INTEGER", "games": "BIGINT"}}},
    "endpoints": {
        "one": {
            "path": "/v1/stats/{id}",
            "datasets": ["stats"],
            "sql": "SELECT * FROM stats WHERE id = $id",
            "params": {"id": {"type": "int"}},
        }
    },
}


def _with(path: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    if value is None:
        del node[last]
    else:
        node[last] = value
    return raw


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    def toml(v: Any) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(toml(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {toml(x)}" for k, x in v.items()) + "}"
        return str(v)

    lines = []
    for section, body in raw.items():
        for name, value in body.items():
            lines.append(f"{section}.{name} = {toml(value)}")
    path = tmp_path / "app.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("path", "value", "key", "problem"),
    [
        ("source.colour", "blue", "source.colour", "unknown key"),
        ("endpoints.one.sqll", "x", "endpoints.one.sqll", "unknown key"),
        ("source.url", None, "source.url", "missing required key"),
        ("endpoints.one.sql", None, "endpoints.one.sql", "missing required key"),
        ("endpoints.one.datasets", ["stats", "builds"], "endpoints.one.datasets",
         "undeclared dataset 'builds'"),
        ("endpoints.one.sql", "SELECT * FROM stats WHERE id = $id AND games > $min",
         "endpoints.one.sql", "$min has no spec"),
        ("endpoints.one.params", {"id": {"type": "integer"}}, "endpoints.one.params.id.type",
         "must be one of"),
        ("endpoints.one.params", {"id": {"type": "int", "min": "one"}},
         "endpoints.one.params.id.min", "expected"),
        ("endpoints.one.sql", "DELETE FROM stats WHERE id = $id", "endpoints.one.sql",
         "must be a SELECT"),
        ("endpoints.one.path", "/v1/stats/{champ}", "endpoints.one.path", "'champ' has no spec"),
        ("endpoints.one.path", "/v1/version", "endpoints.one.path", "reserved"),
        ("endpoints.one.params", {"id": {"type": "int"}, "v": {"type": "int"}},
         "endpoints.one.params.v", "reserved for version tokens"),
        ("endpoints.one.params", {"id": {"type": "int", "ignore_case": True}},
         "endpoints.one.params.id.ignore_case", "enum and string"),
        ("endpoints.one.params", {"id": {"type": "int", "unordered": True}},
         "endpoints.one.params.id.unordered", "list parameters only"),
        ("endpoints.one.warm_sql", "SELECT id FROM stats WHERE games > $x",
         "endpoints.one.warm_sql", "takes no parameters"),
        ("server.cache_mb", -1, "server.cache_mb", "must not be negative"),
        ("server.log_level", "LOUD", "server.log_level",
         "expected one of CRITICAL, ERROR, WARNING, INFO, DEBUG, got 'LOUD'"),
        ("server.warm_seconds", 5, "server.warm_seconds", "removed: the warm's time budgets"),
        ("server.no_such_key", 5, "server.no_such_key", "unknown key"),
        ("datasets.stats.export", "../export-1", "datasets.stats.export", "not an export id"),
        ("datasets.stats.export", 7, "datasets.stats.export", "expected"),
        ("datasets", {"stats": {"key": ["id"], "columns": {"id": "INTEGER"}, "export": "e-2"},
                      "more": {"key": ["id"], "columns": {"id": "INTEGER"}}},
         "groups.run.datasets", "must name the same export, or none: stats e-2, more none"),
    ],
)
def test_config_errors_name_the_key(path: str, value: Any, key: str, problem: str) -> None:
    raw = _with(path, value)
    if path == "datasets":
        raw["groups"] = {"run": {"datasets": ["stats", "more"]}}
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, "app.toml")
    assert info.value.key == key
    assert problem in info.value.problem
    assert str(info.value).startswith(f"app.toml: {key}: ")


@pytest.mark.parametrize(
    ("key", "sql", "fragment"),
    [
        ("sql", "SELECT * FROM stats WHERE idd = $id", 'column "idd" not found'),
        ("sql", "SELECT * FROM builds WHERE id = $id", "builds"),
        ("sql", "SELECT sum(games) FROM stats WHERE id = $id GROUP BY nope", "nope"),
        ("warm_sql", "SELECT id, games FROM stats", "column 'games' is not a parameter"),
        ("warm_sql", "SELECT idd AS id FROM stats", "idd"),
    ],
)
def test_sql_that_does_not_prepare_is_rejected(key: str, sql: str, fragment: str) -> None:
    """Endpoint SQL and warm_sql are both checked at startup; errors name their key."""
    with pytest.raises(ConfigError) as info:
        check_sql(parse_settings(_with(f"endpoints.one.{key}", sql), "app.toml"))
    assert info.value.key == f"endpoints.one.{key}"
    assert fragment in info.value.problem.lower() or fragment in info.value.problem


def test_the_datasets_an_endpoint_reads_come_from_its_sql() -> None:
    """`datasets` is optional: the SQL says which tables it reads (subqueries included, CTEs
    not); a list that disagrees is refused naming the table."""
    raw = _with("datasets.builds", {"key": ["id"], "columns": {"id": "INTEGER"}})
    raw["endpoints"]["one"]["sql"] = "SELECT * FROM builds WHERE id = $id"
    with pytest.raises(ConfigError) as info:
        check_sql(parse_settings(raw, "app.toml"))
    assert info.value.key == "endpoints.one.datasets"
    assert info.value.problem == "lists 'stats', which the SQL does not read"
    raw["endpoints"]["one"]["datasets"] = []
    with pytest.raises(ConfigError, match="does not list 'builds', which the SQL reads"):
        parse_settings(raw, "app.toml")
    del raw["endpoints"]["one"]["datasets"]
    raw["endpoints"]["one"]["sql"] = ("WITH b AS (SELECT * FROM builds) SELECT * FROM b "
                                      "WHERE id = (SELECT max(id) FROM stats WHERE id = $id)")
    assert parse_settings(raw, "app.toml").endpoints["one"].datasets == ("builds", "stats")


def test_check_config_cli(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "serving.cli", "check-config", str(DEMO_CONFIG)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok (5 datasets, 6 endpoints)" in ok.stdout
    bad = _write(tmp_path, _with("endpoints.one.sql", "SELECT * FROM stats WHERE idd = $id"))
    res = subprocess.run(
        [sys.executable, "-m", "serving.cli", "check-config", str(bad)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert res.returncode == 2
    assert f"{bad}: endpoints.one.sql: SQL does not prepare" in res.stderr


@pytest.mark.parametrize(("argv", "error"), [
    (["serve", "--port", "99999"], "argument --port: must be 0-65535, got 99999"),
    (["serve", "--port", "http"], "argument --port: expected a whole number, got 'http'"),
    (["demo", "--seq", "-1"], "argument --seq: must be 1-999999, got -1")])
def test_command_line_numbers_are_checked(tmp_path: Path, argv: list[str], error: str) -> None:
    res = subprocess.run([sys.executable, "-m", "serving.cli", *argv],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and error in res.stderr, res.stderr
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_the_demo_command_never_rewrites_an_export(tmp_path: Path) -> None:
    def demo(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "serving.cli", "demo", "--size", "small",
                               *argv], capture_output=True, text=True, cwd=tmp_path)

    assert demo("--root", "src").returncode == 0
    part = tmp_path / "src" / "patches" / "export-000001" / "part-00000.parquet"
    before = part.stat().st_mtime_ns
    res = demo("--root", "src", "--seq", "1")
    assert res.returncode == 2 and "export-000001 exists" in res.stderr, res.stderr
    assert part.stat().st_mtime_ns == before
    (tmp_path / "file").write_text("")
    res = demo("--root", "file/src")  # a root that cannot be made: one line, no traceback
    assert res.returncode == 2 and "cannot write under file/src" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_env_overrides_single_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE)
    settings = load_settings(path, {"DUCKSWAP_SERVER__PORT": "9123",
                                    "DUCKSWAP_SERVER__HOST": "0.0.0.0",
                                    "DUCKSWAP_SOURCE__URL": "file://data/bucket"})
    assert settings.port == 9123 and settings.host == "0.0.0.0"
    assert settings.source_url == f"file://{(tmp_path / 'data' / 'bucket').resolve()}"
    with pytest.raises(ConfigError) as info:
        load_settings(path, {"DUCKSWAP_SERVER__PORT": "many"})
    assert info.value.key == "server.port"


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[source\nurl=")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert str(path) in str(info.value) and "not valid TOML" in str(info.value)


def test_the_readme_holds_the_config_reference_as_generated() -> None:
    """One source of truth: README's config table is `reference_table()` of `SETTING_KEYS`
    (regenerate it with `python -m engine.settings`)."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- config reference:")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- end of config reference")]
    assert block.strip() == reference_table()


def test_demo_config_uses_only_documented_keys() -> None:
    raw = tomllib.loads(DEMO_CONFIG.read_text())
    for section in ("server", "source"):
        for key in raw[section]:
            assert f"{section}.{key}" in SETTING_KEYS


def test_serve_refuses_a_wrong_config(tmp_path: Path) -> None:
    bad = _write(tmp_path, _with("endpoints.one.datasets", ["stats", "builds"]))
    res = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--config", str(bad)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert res.returncode == 2
    assert f"{bad}: endpoints.one.datasets: reads undeclared dataset 'builds'" in res.stderr


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_requests_are_logged_at_debug_only_on_uvloop(tmp_path: Path, level: str) -> None:
    """Per-request log lines cost the event loop more than a cached answer: only at
    `server.log_level = "DEBUG"`. The workers' loop is uvloop (a dependency)."""
    config = seq_config_file(tmp_path, tmp_path / "data")
    write_seq_export(tmp_path / "src", 1)
    port = free_port()
    env = {**os.environ, "DUCKSWAP_SERVER__PORT": str(port)}
    env["DUCKSWAP_SERVER__LOG_LEVEL"] = level
    server = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--config",
                               str(config)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/rows", timeout=1) as r:
                    assert r.status == 200
                    break
            except (OSError, urllib.error.HTTPError):
                assert time.monotonic() < deadline, "server never answered /v1/rows"
                time.sleep(0.05)  # poll until the first version is served
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    logged = [line for line in err.splitlines() if '"GET /v1/rows' in line]
    assert ("aiohttp.access" in "".join(logged)) == (level == "DEBUG"), err[-2000:]
    assert "event loop: uvloop." in err, err[-2000:]



def test_a_malformed_path_template_is_refused_by_check_config_and_serve(
        tmp_path: Path) -> None:
    """What the router would refuse is a config error, in `check-config` and in `serve`
    alike: a message naming the key, never a traceback."""
    bad = _write(tmp_path, _with("endpoints.one.path", "/v1/stats/{id"))
    for command in (["check-config", str(bad)], ["serve", "--config", str(bad)]):
        res = subprocess.run([sys.executable, "-m", "serving.cli", *command],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert res.returncode == 2, res.stderr
        assert "endpoints.one.path: not a valid route template" in res.stderr
        assert "Traceback" not in res.stderr


def test_an_environment_override_that_fails_names_the_variable(tmp_path: Path) -> None:
    config = _write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        load_settings(config, {"DUCKSWAP_SERVER__PORT": "eighty"})
    assert str(info.value).startswith("DUCKSWAP_SERVER__PORT: server.port: expected an integer")
    with pytest.raises(ConfigError, match=r"^DUCKSWAP_SERVER__PORT__X: server.port: expected"):
        load_settings(config, {"DUCKSWAP_SERVER__PORT__X": "1"})


def test_duckswap_version() -> None:
    res = subprocess.run([sys.executable, "-m", "serving.cli", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"duckswap {version('duckswap')}"


def _cgroupfs(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup filesystem as the kernel shows one (the quota a container runtime sets cannot
    be set on this machine without privileges): /proc/self/cgroup and the files under root."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc-cgroup").write_text(proc)
    return tmp_path / "proc-cgroup", root


@pytest.mark.parametrize(("proc", "files", "quota"), [
    # cgroup v2: the smallest quota along the path counts (here the pod's, above the container)
    ("0::/kubepods/pod1/c1\n", {"cgroup.controllers": "cpu", "kubepods/pod1/cpu.max":
                                 "150000 100000\n", "kubepods/pod1/c1/cpu.max": "max 100000\n"},
     1.5),
    # v2 in a container with its own cgroup namespace: the root folder is the container's
    ("0::/\n", {"cgroup.controllers": "cpu", "cpu.max": "400000 100000\n"}, 4.0),
    # v1 without a cgroup namespace: the host's path, the container's cgroup mounted at root
    ("4:cpu,cpuacct:/docker/abc\n0::/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "250000\n",
                                           "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 2.5),
    # v1 listed `cpuacct,cpu` (RHEL 7), mounted `cpu,cpuacct`
    ("3:cpuacct,cpu:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "300000\n",
                           "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 3.0),
    # what the kernel never writes is no quota, not a failed start
    ("0::/\n", {"cgroup.controllers": "cpu", "cpu.max": "\n"}, None),
    # no quota anywhere: v1's -1, v2's max
    ("1:cpu:/\n0::/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
                         "unified/cpu.max": "max 100000\n"}, None),
])
def test_the_cgroup_cpu_quota_is_read_from_v1_and_v2(
        tmp_path: Path, proc: str, files: dict[str, str], quota: float | None) -> None:
    assert cgroup_cpu_quota(*_cgroupfs(tmp_path, proc, files)) == quota


def test_the_default_workers_follow_the_cgroup_quota_rounded_down_at_least_one(
        tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    for text, workers in (("max 100000", affinity), ("50000 100000", 1),
                          (f"{affinity * 100000 + 99999} 100000", affinity),
                          (f"{100000 * (affinity + 8)} 100000", affinity)):
        paths = _cgroupfs(tmp_path, "0::/\n", {"cgroup.controllers": "", "cpu.max": text})
        assert usable_cpus(*paths) == workers, text
    assert usable_cpus(tmp_path / "missing", tmp_path) == affinity
