"""Config parsed at the edge: one frozen Settings object from TOML, then environment overrides.

Every error names the file, the key and what is wrong.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.config import ConfigError, Reader, positive
from engine.endpoints import EndpointSpec, parse_endpoint
from engine.schema import EXTRA_COLUMNS, DatasetSchema, RunGroup

ENV_PREFIX = "DUCKSWAP_"
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Every documented setting: the one source of README's config table (`reference_table`; a
# test checks the README holds it as generated). `*` stands for a name chosen by the user.
SETTING_KEYS: dict[str, str] = {
    "server.host": "Address to listen on (default 127.0.0.1).",
    "server.port": "TCP port (default 8080).",
    "server.workers": "HTTP worker processes, all answering on the one port (SO_REUSEPORT); "
    "0, the default, starts one per CPU this process may use (its CPU affinity, and its "
    "cgroup's CPU quota rounded down: a Kubernetes CPU limit, `docker run --cpus`).",
    "server.threads": "Queries each worker runs at once for cache misses, each on one DuckDB "
    "thread of its own; also the build and warm threads (default 2).",
    "server.query_timeout": "Seconds before a query is interrupted and answered 504 (default 5).",
    "server.drain_seconds": "After SIGTERM or SIGINT, seconds during which `/readyz` answers "
    "503 while requests are still accepted, so a load balancer stops sending new ones before "
    "the listener closes (default 0; under Kubernetes, a few seconds more than the "
    "readiness probe's period).",
    "server.shutdown_seconds": "After the listener closes, the most seconds the requests in "
    "flight get to finish before the server stops (default 10).",
    "server.log_level": "DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO); at DEBUG "
    "every request is logged to "
    "`aiohttp.access` too (at thousands of requests a second that log costs more CPU than the "
    "answers; the CDN in front keeps its own).",
    "server.cache_mb": "Byte budget of the response cache in MiB: the warmed answers of the "
    "served version and of the one being staged (or just replaced) first, the answers computed "
    "for misses in what they leave; 0 turns it off (default 256).",
    "server.data_dir": "Folder of verified versions and their state, served again after a restart "
    "before the source answers (default: `$XDG_CACHE_HOME/duckswap/<hash of source.url>`).",
    "server.keep_versions": "Versions kept per dataset for rollback, the served one included "
    "(default 2).",
    "server.admin_token": "Bearer token of the `/admin` API, at least 16 characters; without one "
    "the admin routes do not exist (default none; prefer `DUCKSWAP_SERVER__ADMIN_TOKEN`).",
    "source.url": "`file://` folder or `gs://bucket/prefix` holding `<dataset>/<export-id>/` "
    "exports (required).",
    "source.debounce_ms": "watchfiles debounce in milliseconds (default 200).",
    "source.poll_seconds": "`gs://`: seconds between listings (default 5; backs off up to 60 "
    "while the bucket fails).",
    "source.quiet_seconds": "Treat a folder with parts but no marker as complete once nothing "
    "in it changed for this many seconds; the last resort for pipelines that write neither "
    "marker (default 0: off).",
    "source.endpoint_url": "`gs://`: API endpoint, for an emulator (default: Google's, or "
    "`STORAGE_EMULATOR_HOST`).",
    "source.token": "`gs://`: credentials: a service-account JSON file, `anon`, or "
    "`google_default` (default: the standard Google mechanisms).",
    "source.concurrency": "`gs://`: objects downloaded at once (default 4).",
    "source.staging_dir": "`gs://`: local folder for downloads in progress; its `duckswap-*` "
    "folders are removed at startup (default: `staging/` in the data dir).",
    "datasets.*.key": "Lookup key columns; the table is sorted by them (required).",
    "datasets.*.columns": "Required columns and their DuckDB types (required).",
    "datasets.*.required": "Whether /readyz and endpoints wait for this dataset (default true).",
    "datasets.*.extra_columns": "Columns not in `columns`: `keep`, `drop`, or `refuse` the "
    "export (default keep).",
    "datasets.*.allow_empty": "Accept an export with no rows (default false).",
    "datasets.*.not_null": "Columns that must hold no NULL (default none).",
    "datasets.*.unique_key": "Columns no two rows may share (default none).",
    "datasets.*.max_file_mb": "Largest part file accepted, checked before the download "
    "(default none).",
    "datasets.*.max_export_mb": "Largest export accepted, all parts together (default none).",
    "datasets.*.export": "Serve this export id and no other until the key is removed: the "
    "rollback a fleet follows, every replica and any new one (from the data dir where it is "
    "kept, else loaded from the source; `/readyz` answers 503 until it is served). One the "
    "source lacks or refuses is logged and shown (admin API, status page), and what was kept "
    "is served. The admin API's pin, rollback and unpin answer 409 meanwhile; a group's "
    "datasets name the same one (default none: the newest valid export).",
    "groups.*.datasets": "Datasets published together: a pipeline run writes an export of each "
    "with one export id, and the run is loaded and published as one Snapshot once every one "
    "of them has a complete export with that id; if any of them is refused, none is "
    "published (required; a dataset belongs to one group at most).",
    "groups.*.incomplete_seconds": "A run some members of the group have a complete export of, "
    "and others not, is reported (log, admin API, metrics) once it has been incomplete this "
    "long; it is never published incomplete (default 300).",
    "endpoints.*.path": "Route template, e.g. `/v1/champions/{champion_id}/stats` (required).",
    "endpoints.*.sql": "SQL with `$name` parameters; values are bound, never pasted (required).",
    "endpoints.*.datasets": "Datasets the SQL reads (default: the tables the SQL reads, from "
    "DuckDB's parse tree; a list that disagrees with the SQL is refused, naming the table).",
    "endpoints.*.row_limit": "Maximum rows returned; more are cut and flagged (default 1000).",
    "endpoints.*.cache_control": "`Cache-Control` without `?v=` (default "
    "`public, max-age=5, stale-while-revalidate=30`).",
    "endpoints.*.warm": "Compute this endpoint's popular responses before a publish "
    "(default true).",
    "endpoints.*.warm_sql": "A query over declared datasets (typically the endpoint's) whose "
    "columns are named after parameters; every row is a request answered before each publish "
    "(default none).",
    "endpoints.*.params.*.type": "`int`, `float`, `string`, `enum` or `bool` (required).",
    "endpoints.*.params.*.list": "Accept a list (repeated or comma-separated) (default false).",
    "endpoints.*.params.*.max_items": "Longest list accepted (default 50).",
    "endpoints.*.params.*.required": "Must be given (default: true unless `default` is set).",
    "endpoints.*.params.*.default": "Value when absent; absent and not required binds NULL (a "
                                    "list: an empty list).",
    "endpoints.*.params.*.min": "Lowest int/float accepted.",
    "endpoints.*.params.*.max": "Highest int/float accepted.",
    "endpoints.*.params.*.max_length": "Longest string accepted (default 200).",
    "endpoints.*.params.*.pattern": "Regular expression a string must match in full.",
    "endpoints.*.params.*.values": "Allowed values of an enum (required for enum).",
    "endpoints.*.params.*.ignore_case": "Match an enum or string case-insensitively; the value "
    "is normalised (default false).",
    "endpoints.*.params.*.unordered": "A list whose order and repeats do not matter; it is "
    "sorted and deduplicated (default false).",
}

# Keys of earlier releases, refused with what replaced them rather than as merely unknown.
REMOVED_KEYS: dict[str, str] = {
    "access_log": "removed: every request is logged at log_level = \"DEBUG\"",
    "event_loop": "removed: uvloop where it is installed, else asyncio's own loop",
    "metrics": "removed: /metrics is always served",
    "version_cache_control": "removed: /v1/version is `public, max-age=1`",
    "build_nice": "removed: builds run at nice 10 under SCHED_IDLE",
    "build_idle": "removed: builds run at nice 10 under SCHED_IDLE",
    "build_processes": "removed: two build processes",
    "warm_seconds": "removed: the warm's time budgets are fixed (README, Warm before publish)",
    "warm_tail_seconds": "removed: the warm's time budgets are fixed (README, Warm before "
    "publish)",
    "warm_busy_seconds": "removed: the warm's time budgets are fixed (README, Warm before "
    "publish)",
    "warm_keys": "removed: the 10,000 most requested keys of each endpoint are warmed first",
    "query_process": "removed: each HTTP worker runs its own misses (server.workers)",
    "stale_seconds": "removed: every answer comes from the published version or a newer one",
}


@dataclass(frozen=True)
class Settings:
    source_url: str
    datasets: Mapping[str, DatasetSchema]
    endpoints: Mapping[str, EndpointSpec]
    groups: Mapping[str, RunGroup] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8080
    threads: int = 2
    query_timeout: float = 5.0
    workers: int = 0  # 0: one per CPU the process may use (`worker_count`)
    log_level: str = "INFO"
    drain_seconds: float = 0.0
    shutdown_seconds: float = 10.0
    debounce_ms: int = 200
    poll_seconds: float = 5.0
    quiet_seconds: float = 0.0
    endpoint_url: str | None = None
    token: str | None = field(default=None, repr=False)  # credentials: never printed
    admin_token: str | None = field(default=None, repr=False)
    data_dir: str | None = None
    keep_versions: int = 2
    concurrency: int = 4
    staging_dir: str | None = None
    cache_mb: float = 256.0
    file: str = field(default="<config>", compare=False)
    # key -> the environment variable that set it (`apply_env`), for errors to name
    env: Mapping[str, str] = field(default_factory=dict, compare=False)

    def origin(self, *keys: str) -> str:
        """What set `keys` (the first set from the environment wins): its variable, else the
        config file; an error about them names it."""
        return next((v for k in keys if (v := _variable(self.env, k))), self.file)

    @property
    def source_path(self) -> Path:
        return Path(self.source_url.removeprefix("file://"))

    def worker_count(self) -> int:
        """HTTP workers to run: `workers`, or one per CPU this process may use."""
        return self.workers or usable_cpus()


def usable_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"),
                root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its CPU affinity, and its cgroup's CPU quota (what a
    Kubernetes CPU limit or `docker run --cpus` sets) rounded down, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc_cgroup, root)
    return cpus if quota is None else max(1, min(cpus, int(quota)))


def cgroup_cpu_quota(proc_cgroup: Path = Path("/proc/self/cgroup"),
                     root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, the smallest along its path (cgroup v2
    `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None where none is set."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    files: tuple[str, ...]
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:  # v2 (hybrid systems mount it at unified/)
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            files = ("cpu.max",)
        elif "cpu" in controllers.split(","):
            # mounted under its name as listed, or the other way round (`cpuacct,cpu` listed,
            # `cpu,cpuacct` mounted), or the `cpu` link
            names = (controllers, ",".join(reversed(controllers.split(","))), "cpu")
            base = next((root / n for n in names if (root / n).is_dir()), root / controllers)
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        for folder in _cgroup_folders(base, path):
            try:
                values = " ".join((folder / f).read_text() for f in files).split()
                if values[0] not in ("max", "-1") and int(values[1]) > 0:
                    quotas.append(int(values[0]) / int(values[1]))
            except (OSError, ValueError, IndexError):  # absent, or not what the kernel writes
                continue
    return min(quotas, default=None)


def _cgroup_folders(base: Path, path: str) -> list[Path]:
    """`base/path` and its parents up to `base`. In a container without a cgroup namespace,
    `path` names the host's hierarchy, and `base` is the container's own cgroup."""
    parts = [p for p in path.split("/") if p]
    folders = [base.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
    return [f for f in folders if f.is_dir()] + [base]

def _parse_dataset(r: Reader, name: str) -> DatasetSchema:
    import duckdb

    if not NAME_RE.match(name):
        raise r.fail(name, "dataset names must be SQL identifiers")
    d = r.sub(name)
    cols_r = d.sub("columns")
    columns = {}
    for c in cols_r.table:
        text = cols_r.get(c, str)
        try:
            columns[c] = str(duckdb.sqltype(text))  # DuckDB's own spelling: INT -> INTEGER
        except duckdb.Error:
            raise cols_r.fail(c, f"not a DuckDB type: {text!r}") from None
    if not columns:
        raise d.fail("columns", "must declare at least one column")

    def declared(option: str, default: Any) -> tuple[str, ...]:
        names = d.get(option, list, default)
        for k in names:
            if k not in columns:
                raise d.fail(option, f"column {k!r} is not in columns")
        return tuple(names)

    def megabytes(option: str) -> int | None:
        mb = d.get(option, (int, float), None)
        if mb is None:
            return None
        positive(d, option, mb)
        return int(mb * 2**20)

    export = d.get("export", str, None)
    if export is not None and (not export or "/" in export or export.startswith(".")):
        raise d.fail("export", f"not an export id (a folder name): {export!r}")
    extra = d.get("extra_columns", str, "keep")
    if extra not in EXTRA_COLUMNS:
        raise d.fail("extra_columns", f"must be one of {', '.join(EXTRA_COLUMNS)}, got {extra!r}")
    spec = DatasetSchema(
        name, declared("key", ...), columns, d.get("required", bool, True),
        extra_columns=extra,
        allow_empty=d.get("allow_empty", bool, False),
        not_null=declared("not_null", []),
        unique_key=declared("unique_key", []),
        max_file_bytes=megabytes("max_file_mb"),
        max_export_bytes=megabytes("max_export_mb"),
        export=export,
    )
    d.finish()
    return spec


def _parse_groups(r: Reader, datasets: Mapping[str, DatasetSchema]) -> dict[str, RunGroup]:
    groups: dict[str, RunGroup] = {}
    owner: dict[str, str] = {}
    for name in r.table:
        g = r.sub(name)
        members = g.get("datasets", list)
        if not members:
            raise g.fail("datasets", "must name at least one dataset")
        for d in members:
            if d not in datasets:
                raise g.fail("datasets", f"no dataset {d!r} is declared")
            if d in owner:
                raise g.fail("datasets", f"dataset {d!r} is already in group {owner[d]!r}")
            owner[d] = name
        named = {datasets[d].export for d in members}
        if len(named) > 1:
            raise g.fail("datasets", "its datasets must name the same export, or none: "
                         + ", ".join(f"{d} {datasets[d].export or 'none'}" for d in members))
        seconds = float(g.get("incomplete_seconds", (int, float), 300.0))
        positive(g, "incomplete_seconds", seconds)
        g.finish()
        groups[name] = RunGroup(name, tuple(members), seconds)
    return groups


def parse_settings(raw: Mapping[str, Any], file: str = "<config>") -> Settings:
    root = Reader(file, "", dict(raw))
    server = root.sub("server", {})
    for old in sorted(REMOVED_KEYS.keys() & server.table.keys()):
        raise server.fail(old, REMOVED_KEYS[old])
    source = root.sub("source")
    ds_r = root.sub("datasets")
    datasets = {name: _parse_dataset(ds_r, name) for name in ds_r.table}
    if not datasets:
        raise root.fail("datasets", "must declare at least one dataset")
    groups = _parse_groups(root.sub("groups", {}), datasets)
    ep_r = root.sub("endpoints")
    endpoints = {name: parse_endpoint(ep_r, name, datasets) for name in ep_r.table}
    url = source.get("url", str)
    if not url.startswith(("file://", "gs://")):
        raise source.fail("url", f"expected a file:// or gs:// URL, got {url!r}")
    if url.startswith("gs://") and not url.removeprefix("gs://").strip("/"):
        raise source.fail("url", "gs:// URL needs a bucket")
    settings = Settings(
        source_url=url,
        datasets=datasets,
        groups=groups,
        endpoints=endpoints,
        host=server.get("host", str, "127.0.0.1"),
        port=server.get("port", int, 8080),
        threads=server.get("threads", int, 2),
        query_timeout=float(server.get("query_timeout", (int, float), 5.0)),
        workers=server.get("workers", int, 0),
        log_level=server.get("log_level", str, "INFO"),
        drain_seconds=float(server.get("drain_seconds", (int, float), 0.0)),
        shutdown_seconds=float(server.get("shutdown_seconds", (int, float), 10.0)),
        debounce_ms=source.get("debounce_ms", int, 200),
        poll_seconds=float(source.get("poll_seconds", (int, float), 5.0)),
        quiet_seconds=float(source.get("quiet_seconds", (int, float), 0.0)),
        endpoint_url=source.get("endpoint_url", str, None),
        token=source.get("token", str, None, secret=True),
        admin_token=server.get("admin_token", str, None, secret=True),
        data_dir=server.get("data_dir", str, None),
        keep_versions=server.get("keep_versions", int, 2),
        concurrency=source.get("concurrency", int, 4),
        staging_dir=source.get("staging_dir", str, None),
        cache_mb=float(server.get("cache_mb", (int, float), 256.0)),
        file=file,
    )
    if settings.quiet_seconds < 0:
        raise source.fail("quiet_seconds", f"must not be negative, got {settings.quiet_seconds}")
    for name in ("cache_mb", "drain_seconds", "shutdown_seconds", "workers"):
        if getattr(settings, name) < 0:
            raise server.fail(name, f"must not be negative, got {getattr(settings, name)!r}")
    positive(source, "poll_seconds", settings.poll_seconds)
    positive(server, "keep_versions", settings.keep_versions)
    if settings.admin_token is not None and len(settings.admin_token) < 16:
        raise server.fail("admin_token", "must be at least 16 characters")  # never echoed
    positive(source, "concurrency", settings.concurrency)
    positive(server, "threads", settings.threads)
    positive(server, "query_timeout", settings.query_timeout)
    levels = [n for n in logging.getLevelNamesMapping() if n not in ("NOTSET", "WARN", "FATAL")]
    if settings.log_level.upper() not in levels:
        raise server.fail("log_level", f"expected one of {', '.join(levels)}, got "
                                       f"{settings.log_level!r}")
    if not 0 <= settings.port <= 65535:
        raise server.fail("port", f"must be 0-65535, got {settings.port}")
    for r in (server, source, root):
        r.finish()
    paths = [e.path for e in endpoints.values()]
    for e in endpoints.values():
        if paths.count(e.path) > 1:
            raise ConfigError(file, f"endpoints.{e.name}.path", f"duplicate path {e.path!r}")
    return settings


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """`DUCKSWAP_SERVER__PORT=9000` sets `server.port` in `raw`; values are read as TOML,
    else string. Returns key -> the variable that set it."""
    applied: dict[str, str] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name.removeprefix(ENV_PREFIX).split("__")]
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(name, ".".join(path), f"{part!r} is not a table")
        node[path[-1]] = _env_value(text)
        applied[".".join(path)] = name
    return applied


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    file = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(file, "<file>", "no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "<file>", f"not valid TOML: {exc}") from None
    from_env = apply_env(raw, os.environ if environ is None else environ)
    base = Path(path).resolve().parent
    source = raw.get("source")
    if isinstance(source, dict) and isinstance(source.get("url"), str):
        url = source["url"]
        if url.startswith("file://") and not url.startswith("file:///"):
            source["url"] = "file://" + str((base / url.removeprefix("file://")).resolve())
    try:
        return replace(parse_settings(raw, file), env=from_env)
    except ConfigError as exc:
        variable = _variable(from_env, exc.key)
        if variable is None:
            raise
        raise ConfigError(variable, exc.key, exc.problem) from None


def _variable(from_env: Mapping[str, str], key: str) -> str | None:
    """The variable that set `key` or a key inside it (`apply_env`), if one did."""
    return next((v for k, v in from_env.items() if k == key or k.startswith(key + ".")), None)


def reference_table() -> str:
    """README's config table, generated from `SETTING_KEYS`."""
    rows = [f"| `{key}` | {text} |" for key, text in SETTING_KEYS.items()]
    return "\n".join(["| key | meaning |", "| --- | --- |", *rows])


if __name__ == "__main__":  # python -m engine.settings > the table to paste into the README
    print(reference_table())
