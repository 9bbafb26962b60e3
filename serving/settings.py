"""Config parsed at the edge: one frozen Settings object from TOML, then environment overrides.

Every error names the file, the key and what is wrong.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loaders.schema import EXTRA_COLUMNS, DatasetSchema

ENV_PREFIX = "DUCKSWAP_"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
PARAM_TYPES = ("int", "float", "string", "enum", "bool")
PATH_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Every documented setting; tests check each appears in README's config table.
# `*` stands for a name chosen by the user.
SETTING_KEYS: dict[str, str] = {
    "server.host": "Address to listen on (default 127.0.0.1).",
    "server.port": "TCP port (default 8080).",
    "server.threads": "Queries run at once, each on one DuckDB thread (default 2).",
    "server.query_timeout": "Seconds before a query is interrupted and answered 504 (default 5).",
    "server.log_level": "Python log level (default INFO).",
    "server.access_log": "Log one line per request to the `aiohttp.access` logger at INFO "
    "(default false: at thousands of requests a second the log costs more CPU than the "
    "answers; the CDN in front keeps its own).",
    "server.event_loop": "`auto` (default): uvloop where it is installed (it is a dependency "
    "except on Windows), else asyncio's own loop; `uvloop` or `asyncio` to choose. uvloop "
    "spends less CPU on each request's I/O (at 2000 req/s: a bare aiohttp handler 0.36 "
    "against 0.47 cores, the overlay mix 0.81 against 0.87).",
    "server.cache_mb": "Byte budget of the response cache in MiB: the warmed answers of the "
    "served version and of the one being staged (or just replaced) first, the answers computed "
    "for misses in what they leave; 0 turns it off (default 256).",
    "server.warm_seconds": "Seconds spent before a publish on `warm_sql` rows and small "
    "parameter spaces, once the most requested keys (always all answered) are done (default 0: "
    "on an idle machine they are answered right after the publish, which comes sooner; on a "
    "busy one see `warm_busy_seconds`).",
    "server.warm_tail_seconds": "Seconds more, after the publish, for the keys the first pass "
    "had no time for (default 10; 0: none).",
    "server.warm_busy_seconds": "On a busy machine (the warm, at idle priority, gets under 0.9 of "
    "a core, or the requests since the last warm asked 20 or more a second for warmed answers "
    "beyond the hot keys it chose) the warm before a publish and the one after it go on past "
    "`warm_seconds` and `warm_tail_seconds`, up to this many seconds, instead of leaving keys "
    "to cache misses that would keep them starved (default 60; 0: never).",
    "server.warm_keys": "Most popular keys per endpoint replayed before a publish (default 10000).",
    "server.version_cache_control": "`Cache-Control` of `/v1/version` (default "
    "`public, max-age=1`).",
    "server.metrics": "Serve Prometheus metrics on `/metrics` (default true).",
    "server.build_nice": "Nice value of the build process (it also runs the warm queries), so "
    "builds and warming yield to requests; 0 keeps normal priority (default 10).",
    "server.build_idle": "Run the build process under Linux `SCHED_IDLE`: it gets a core only "
    "when requests leave one idle, so builds stretch under load instead of adding latency; "
    "false leaves it at `build_nice` alone (default true).",
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
    "endpoints.*.path": "Route template, e.g. `/v1/champions/{champion_id}/stats` (required).",
    "endpoints.*.sql": "SQL with `$name` parameters; values are bound, never pasted (required).",
    "endpoints.*.datasets": "Datasets the SQL reads (required).",
    "endpoints.*.row_limit": "Maximum rows returned; more are cut and flagged (default 1000).",
    "endpoints.*.cache_control": "`Cache-Control` without `?v=` (default "
    "`public, max-age=5, stale-while-revalidate=30`).",
    "endpoints.*.warm": "Compute this endpoint's popular responses before a publish "
    "(default true).",
    "endpoints.*.warm_sql": "A query over the endpoint's datasets whose columns are named after "
    "parameters; every row is a request answered before each publish (default none).",
    "endpoints.*.params.*.type": "`int`, `float`, `string`, `enum` or `bool` (required).",
    "endpoints.*.params.*.list": "Accept a list (repeated or comma-separated) (default false).",
    "endpoints.*.params.*.max_items": "Longest list accepted (default 50).",
    "endpoints.*.params.*.required": "Must be given (default: true unless `default` is set).",
    "endpoints.*.params.*.default": "Value when absent; absent and not required binds NULL.",
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


class ConfigError(ValueError):
    """A config that cannot be served; the message names the file and the key."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}")
        self.file = file
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str
    is_list: bool = False
    max_items: int = 50
    required: bool = True
    default: Any = None
    min: float | None = None
    max: float | None = None
    max_length: int = 200
    pattern: str | None = None
    values: tuple[str, ...] = ()
    ignore_case: bool = False
    unordered: bool = False


DEFAULT_CACHE_CONTROL = "public, max-age=5, stale-while-revalidate=30"
RESERVED_PATHS = ("/healthz", "/readyz", "/metrics", "/v1/version", "/admin")


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    path: str
    sql: str
    datasets: tuple[str, ...]
    params: Mapping[str, ParamSpec]
    row_limit: int = 1000
    cache_control: str = DEFAULT_CACHE_CONTROL
    warm: bool = True
    warm_sql: str | None = None


@dataclass(frozen=True)
class Settings:
    source_url: str
    datasets: Mapping[str, DatasetSchema]
    endpoints: Mapping[str, EndpointSpec]
    host: str = "127.0.0.1"
    port: int = 8080
    threads: int = 2
    query_timeout: float = 5.0
    log_level: str = "INFO"
    access_log: bool = False
    event_loop: str = "auto"
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
    warm_seconds: float = 0.0
    warm_tail_seconds: float = 10.0
    warm_busy_seconds: float = 60.0
    warm_keys: int = 10000
    version_cache_control: str = "public, max-age=1"
    metrics: bool = True
    build_nice: int = 10
    build_idle: bool = True
    file: str = field(default="<config>", compare=False)

    @property
    def source_path(self) -> Path:
        return Path(self.source_url.removeprefix("file://"))


class _Reader:
    """Reads one table of the config, tracking which keys were used."""

    def __init__(self, file: str, prefix: str, table: Any) -> None:
        self.file = file
        self.prefix = prefix
        if not isinstance(table, dict):
            raise ConfigError(file, prefix or "<root>", "must be a table")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., ) -> Any:
        self.used.add(name)
        if name not in self.table:
            if default is ...:
                raise self.fail(name, "missing required key")
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(name, f"expected {_kind_names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.fail(name, f"expected {_kind_names(kinds)}, got {value!r}")
        return value

    def sub(self, name: str, default: Any = ...) -> _Reader:
        value = self.get(name, dict, default)
        return _Reader(self.file, self.key(name), value)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _positive(r: _Reader, name: str, value: float) -> None:
    if value <= 0:
        raise r.fail(name, f"must be positive, got {value!r}")


def _parse_param(r: _Reader, name: str) -> ParamSpec:
    p = r.sub(name)
    ptype = p.get("type", str)
    if ptype not in PARAM_TYPES:
        raise p.fail("type", f"must be one of {', '.join(PARAM_TYPES)}, got {ptype!r}")
    values = tuple(p.get("values", list, [] if ptype != "enum" else ...))
    if ptype == "enum" and (not values or not all(isinstance(v, str) for v in values)):
        raise p.fail("values", "an enum needs a non-empty list of strings")
    pattern = p.get("pattern", str, None)
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise p.fail("pattern", f"invalid regular expression: {exc}") from None
    has_default = "default" in p.table
    default = p.get("default", (int, float, str, bool, list), None)
    spec = ParamSpec(
        name=name,
        type=ptype,
        is_list=p.get("list", bool, False),
        max_items=p.get("max_items", int, 50),
        required=p.get("required", bool, not has_default),
        default=default,
        min=p.get("min", (int, float), None),
        max=p.get("max", (int, float), None),
        max_length=p.get("max_length", int, 200),
        pattern=pattern,
        values=values,
        ignore_case=p.get("ignore_case", bool, False),
        unordered=p.get("unordered", bool, False),
    )
    p.finish()
    if spec.ignore_case and ptype not in ("enum", "string"):
        raise p.fail("ignore_case", "applies to enum and string parameters only")
    if spec.unordered and not spec.is_list:
        raise p.fail("unordered", "applies to list parameters only")
    if spec.ignore_case and ptype == "enum" and len({v.lower() for v in values}) != len(values):
        raise p.fail("values", "values differ only in case, so ignore_case is ambiguous")
    if spec.required and has_default:
        raise p.fail("default", "a required parameter cannot have a default")
    if has_default:
        # Late import keeps settings free of a cycle; params validates the default itself.
        from serving.params import ParamError, parse_value

        raw = default if isinstance(default, list) else [default]
        try:
            parse_value(spec, [str(v).lower() if isinstance(v, bool) else str(v) for v in raw])
        except ParamError as exc:
            raise p.fail("default", exc.message) from None
    return spec


def _parse_endpoint(r: _Reader, name: str, datasets: Mapping[str, DatasetSchema]) -> EndpointSpec:
    e = r.sub(name)
    path = e.get("path", str)
    if not path.startswith("/"):
        raise e.fail("path", f"must start with '/', got {path!r}")
    for reserved in RESERVED_PATHS:
        if path == reserved or path.startswith(reserved + "/"):
            raise e.fail("path", f"{reserved} is reserved by the server")
    sql = e.get("sql", str).strip().rstrip(";").strip()
    if not sql:
        raise e.fail("sql", "must not be empty")
    ds = e.get("datasets", list)
    if not ds:
        raise e.fail("datasets", "must name at least one dataset")
    for d in ds:
        if d not in datasets:
            raise e.fail("datasets", f"reads undeclared dataset {d!r}")
    params_r = e.sub("params", {})
    params = {pname: _parse_param(params_r, pname) for pname in params_r.table}
    if "v" in params:
        raise params_r.fail("v", "`v` is reserved for version tokens (`?v=`)")
    row_limit = e.get("row_limit", int, 1000)
    _positive(e, "row_limit", row_limit)
    cache_control = e.get("cache_control", str, DEFAULT_CACHE_CONTROL)
    warm = e.get("warm", bool, True)
    warm_sql = e.get("warm_sql", str, None)
    e.finish()
    if warm_sql is not None:
        warm_sql = warm_sql.strip().rstrip(";").strip()
        if sql_parameters(warm_sql, r.file, e.key("warm_sql")):
            raise e.fail("warm_sql", "takes no parameters")
    for pname in PATH_PARAM_RE.findall(path):
        if pname not in params:
            raise e.fail("path", f"path parameter {pname!r} has no spec in params")
        if params[pname].is_list:
            raise e.fail(f"params.{pname}.list", "a path parameter cannot be a list")
    used = sql_parameters(sql, r.file, e.key("sql"))
    for pname in used:
        if pname not in params:
            raise e.fail("sql", f"SQL parameter ${pname} has no spec in params")
    for pname in params:
        if pname not in used:
            raise e.fail(f"params.{pname}", "declared but not used in the SQL")
    return EndpointSpec(name, path, sql, tuple(ds), params, row_limit, cache_control, warm,
                        warm_sql)


def sql_parameters(sql: str, file: str, key: str) -> set[str]:
    """Named `$parameters` of one SQL statement, as DuckDB's parser sees them."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ConfigError(file, key, f"SQL does not parse: {exc}") from None
    if len(statements) != 1:
        raise ConfigError(file, key, f"must be exactly one statement, got {len(statements)}")
    stmt = statements[0]
    if stmt.type != duckdb.StatementType.SELECT:
        raise ConfigError(file, key, f"must be a SELECT statement, got {stmt.type.name}")
    return set(stmt.named_parameters)


def _parse_dataset(r: _Reader, name: str) -> DatasetSchema:
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
        _positive(d, option, mb)
        return int(mb * 2**20)

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
    )
    d.finish()
    return spec


def parse_settings(raw: Mapping[str, Any], file: str = "<config>") -> Settings:
    root = _Reader(file, "", dict(raw))
    server = root.sub("server", {})
    source = root.sub("source")
    ds_r = root.sub("datasets")
    datasets = {name: _parse_dataset(ds_r, name) for name in ds_r.table}
    if not datasets:
        raise root.fail("datasets", "must declare at least one dataset")
    ep_r = root.sub("endpoints")
    endpoints = {name: _parse_endpoint(ep_r, name, datasets) for name in ep_r.table}
    url = source.get("url", str)
    if not url.startswith(("file://", "gs://")):
        raise source.fail("url", f"expected a file:// or gs:// URL, got {url!r}")
    if url.startswith("gs://") and not url.removeprefix("gs://").strip("/"):
        raise source.fail("url", "gs:// URL needs a bucket")
    settings = Settings(
        source_url=url,
        datasets=datasets,
        endpoints=endpoints,
        host=server.get("host", str, "127.0.0.1"),
        port=server.get("port", int, 8080),
        threads=server.get("threads", int, 2),
        query_timeout=float(server.get("query_timeout", (int, float), 5.0)),
        log_level=server.get("log_level", str, "INFO"),
        access_log=server.get("access_log", bool, False),
        event_loop=server.get("event_loop", str, "auto"),
        debounce_ms=source.get("debounce_ms", int, 200),
        poll_seconds=float(source.get("poll_seconds", (int, float), 5.0)),
        quiet_seconds=float(source.get("quiet_seconds", (int, float), 0.0)),
        endpoint_url=source.get("endpoint_url", str, None),
        token=source.get("token", str, None),
        admin_token=server.get("admin_token", str, None),
        data_dir=server.get("data_dir", str, None),
        keep_versions=server.get("keep_versions", int, 2),
        concurrency=source.get("concurrency", int, 4),
        staging_dir=source.get("staging_dir", str, None),
        cache_mb=float(server.get("cache_mb", (int, float), 256.0)),
        warm_seconds=float(server.get("warm_seconds", (int, float), 0.0)),
        warm_tail_seconds=float(server.get("warm_tail_seconds", (int, float), 10.0)),
        warm_busy_seconds=float(server.get("warm_busy_seconds", (int, float), 60.0)),
        warm_keys=server.get("warm_keys", int, 10000),
        version_cache_control=server.get("version_cache_control", str, "public, max-age=1"),
        metrics=server.get("metrics", bool, True),
        build_nice=server.get("build_nice", int, 10),
        build_idle=server.get("build_idle", bool, True),
        file=file,
    )
    if settings.quiet_seconds < 0:
        raise source.fail("quiet_seconds", f"must not be negative, got {settings.quiet_seconds}")
    for name in ("cache_mb", "warm_seconds", "warm_tail_seconds", "warm_busy_seconds",
                 "warm_keys", "build_nice"):
        if getattr(settings, name) < 0:
            raise server.fail(name, f"must not be negative, got {getattr(settings, name)!r}")
    if settings.event_loop not in EVENT_LOOPS:
        raise server.fail("event_loop", f"expected one of {', '.join(EVENT_LOOPS)}, "
                          f"got {settings.event_loop!r}")
    if settings.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise server.fail("event_loop", "uvloop is not installed (pip install uvloop)")
    if settings.build_nice > 19:
        raise server.fail("build_nice", f"must be 0-19, got {settings.build_nice}")
    _positive(source, "poll_seconds", settings.poll_seconds)
    _positive(server, "keep_versions", settings.keep_versions)
    if settings.admin_token is not None and len(settings.admin_token) < 16:
        raise server.fail("admin_token", "must be at least 16 characters")  # never echoed
    _positive(source, "concurrency", settings.concurrency)
    _positive(server, "threads", settings.threads)
    _positive(server, "query_timeout", settings.query_timeout)
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


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """`DUCKSWAP_SERVER__PORT=9000` sets `server.port`; values are read as TOML, else string."""
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name.removeprefix(ENV_PREFIX).split("__")]
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _env_value(text)
    return raw


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    file = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(file, "<file>", "no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "<file>", f"not valid TOML: {exc}") from None
    raw = apply_env(raw, os.environ if environ is None else environ)
    base = Path(path).resolve().parent
    source = raw.get("source")
    if isinstance(source, dict) and isinstance(source.get("url"), str):
        url = source["url"]
        if url.startswith("file://") and not url.startswith("file:///"):
            source["url"] = "file://" + str((base / url.removeprefix("file://")).resolve())
    return parse_settings(raw, file)
