"""The composition root: `duckswap serve | check-config | check-export | demo`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The build processes import this module again (multiprocessing's spawn): aiohttp and pyarrow
# are imported where they are used, not here.
if TYPE_CHECKING:
    from engine.settings import Settings
    from loaders.loader import Loader
    from loaders.workers import Workers

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "data" / "demo.toml"
DEMO_ROOT_ENV = "DUCKSWAP_SOURCE__URL"


def _load(config: str | None) -> Settings:
    from engine.settings import load_settings
    from engine.sqlcheck import check_sql

    if config is None:
        # The bundled demo, with its source in ./duckswap-demo unless the env says otherwise.
        env = dict(os.environ)
        env.setdefault(DEMO_ROOT_ENV, f'"file://{Path.cwd() / "duckswap-demo"}"')
        settings = load_settings(DEMO_CONFIG, env)
        if settings.source_url.startswith("file://"):
            from data.generate import missing_demo, write_first_demo

            root = settings.source_path
            missing = missing_demo(root)
            if missing:
                print(f"writing demo export into {root} ...", file=sys.stderr)
                write_first_demo(root, missing)
    else:
        settings = load_settings(config)
    check_routes(settings)
    check_sql(settings)
    return settings


def check_routes(settings: Settings) -> None:
    """Each endpoint's path is a route template the server's router takes (aiohttp's own
    check, so whatever `serve` would refuse is refused by `check-config` too)."""
    from aiohttp import web

    from engine.config import ConfigError

    router = web.UrlDispatcher()
    for spec in settings.endpoints.values():
        try:
            router.add_resource(spec.path)
        except ValueError as exc:
            raise ConfigError(settings.file, f"endpoints.{spec.name}.path",
                              f"not a valid route template: {exc}") from None


def _settings_or_none(config: str | None) -> Settings | None:
    """The validated settings, or None after printing the config error."""
    from engine.config import ConfigError

    try:
        return _load(config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return None


class _Stopped(Exception):
    """SIGTERM or SIGINT before the server listens (the demo being written, say)."""


def cmd_serve(args: argparse.Namespace) -> int:
    # Until the event loop takes them over, a signal ends start-up cleanly (nothing it wrote
    # is left half-done: the demo is written aside and renamed into place).
    signalled: list[str] = []

    def stop_now(signum: int, frame: object) -> None:
        signalled.append(signal.Signals(signum).name)
        raise _Stopped(signalled[0])

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_now)
    try:
        return _start(args)
    except Exception as exc:
        if signalled:  # DuckDB turns the exception into its own "interrupted" error
            print(f"stopped ({signalled[0]}) before serving", file=sys.stderr)
            return 0
        # One line, not a traceback; `server.log_level = "DEBUG"` logs the traceback too.
        logging.getLogger("duckswap").debug("start-up failed", exc_info=True)
        print(f"duckswap serve: could not start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _start(args: argparse.Namespace) -> int:
    settings = _settings_or_none(args.config)
    if settings is None:
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    given = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if given:  # the command line wins, and an error about them names it
        settings = replace(settings, **given,
                           env={**settings.env, **{f"server.{k}": f"--{k}" for k in given}})
    host, port = settings.host, settings.port
    from loaders.loader import Loader
    from loaders.state import DataDirError
    from loaders.workers import Workers

    workers = Workers()
    try:
        loader = Loader(settings, workers)
    except DataDirError as exc:
        print(f"{settings.origin('server.data_dir')}: server.data_dir: {exc}", file=sys.stderr)
        return 2
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(loader, workers, host, port, settings))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _serve(loader: Loader, workers: Workers, host: str, port: int,
                 settings: Settings) -> int:
    """Run the loader here and the HTTP workers as processes until SIGTERM or SIGINT, then
    stop cleanly: every worker's /readyz answers 503 at once; after `server.drain_seconds`
    the listeners close, the requests in flight get up to `server.shutdown_seconds` to
    finish, then loads and warms are cancelled and the build processes stop. A second signal
    exits at once."""
    from loaders.supervisor import Supervisor

    log = logging.getLogger("duckswap")
    loop = asyncio.get_running_loop()
    signalled: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not signalled.done():
            signalled.set_result(sig.name)
            return
        log.warning("%s again: exiting now", sig.name)
        os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    supervisor = Supervisor(settings, loader, workers, host, port)
    try:
        port = supervisor.bind()
    except OSError as exc:  # the port is taken, the address is not this machine's
        print(f"{settings.origin('server.host', 'server.port')}: cannot listen on "
              f"{host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        loader.close()
        return 2
    stop = asyncio.Event()
    loading = asyncio.create_task(loader.run(stop), name="duckswap-loader")
    starting = asyncio.create_task(supervisor.start())
    log.info("serving %d endpoints from %s on http://%s:%d (%d HTTP workers)",
             len(settings.endpoints), settings.source_url, host, port, supervisor.count)
    waiters: list[asyncio.Future[Any]] = [signalled, starting]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        log.error("the workers could not start: %s", starting.exception())
    name = await signalled
    log.info("shutting down (%s): /readyz answers 503; closing the listener in %gs, then "
             "up to %gs for the requests in flight", name, settings.drain_seconds,
             settings.shutdown_seconds)
    starting.cancel()
    await supervisor.stop(settings.drain_seconds, settings.shutdown_seconds)
    await loader.shutdown(stop, loading)
    log.info("stopped")
    return 0


# Connections the kernel queues before the loop accepts them (capped by net.core.somaxconn), as
# uvicorn and gunicorn do; aiohttp's 128 overflowed in runs up to 5000 req/s on this box
# (connections grow while requests wait out a stall), and a dropped SYN is retried after 1 s.
BACKLOG = 2048


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (a dependency except on Windows), else asyncio's own loop.
    uvloop (libuv) spends less CPU per request: at 2000 req/s on a 2-core box with k6 beside
    it, a bare aiohttp handler 0.34-0.38 against 0.45-0.52 cores, the overlay mix 0.80-0.82
    against 0.85-0.89."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings_or_none(args.config)
    if settings is None:
        return 2
    print(f"{args.config}: ok ({len(settings.datasets)} datasets, "
          f"{len(settings.endpoints)} endpoints)")
    return 0


def cmd_check_export(args: argparse.Namespace) -> int:
    """Run the server's checks on a local export folder; exit 1 on any problem."""
    from engine.config import ConfigError
    from engine.settings import load_settings
    from loaders.check import check_folder

    try:
        settings = load_settings(args.config or DEMO_CONFIG)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    folder = Path(args.path)
    if not folder.is_dir():
        print(f"{folder}: not a folder", file=sys.stderr)
        return 2
    dataset = args.dataset or folder.resolve().parent.name
    schema = settings.datasets.get(dataset)
    if schema is None:
        print(f"{folder}: no dataset {dataset!r} in {settings.file} (--dataset: one of "
              f"{', '.join(settings.datasets)})", file=sys.stderr)
        return 2
    report = check_folder(folder, schema, settings.threads)
    if report.problems:
        n = len(report.problems)
        print(f"{folder}: refused as {dataset} ({n} problem{'' if n == 1 else 's'}):")
        for problem in report.problems:
            print(f"  - {problem}")
        return 1
    print(f"{folder}: ok as {dataset}: {report.rows} rows, version {report.version_id}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from data.generate import DATASETS, export_id, next_seq, write_export

    root = Path(args.root)
    seq = args.seq if args.seq is not None else next_seq(root)
    there = [str(p) for d in DATASETS if (p := root / d / export_id(seq)).exists()]
    if there:  # a server may have loaded it: an export id never names other data
        print(f"duckswap demo: {there[0]} exists; an export is never rewritten (omit --seq "
              "for the next one)", file=sys.stderr)
        return 2
    try:
        written = write_export(root, seq, args.size, manifest=args.manifest)
    except OSError as exc:
        print(f"duckswap demo: cannot write under {root}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    for name, folder in written.items():
        print(f"{name}: {folder}")
    return 0


def _number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an int from `low` to `high`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}-{high}, got {value}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    from engine import openapi

    parser = argparse.ArgumentParser(prog="duckswap", description="Hot-swappable DuckDB serving")
    parser.add_argument("--version", action="version",
                        version=f"duckswap {openapi.version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the endpoints of a config (default: the demo)")
    serve.add_argument("--config", help="TOML config file; omit to serve the bundled demo")
    serve.add_argument("--host", default=None, help="address to listen on (default: "
                       "server.host, 127.0.0.1)")
    serve.add_argument("--port", type=_number(0, 65535), default=None,
                       help="port to listen on, 0 for any free one (default: server.port, 8080)")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a config and prepare its SQL")
    check.add_argument("config")
    check.set_defaults(func=cmd_check)
    export = sub.add_parser("check-export", help="run the server's checks on a local export "
                            "folder before uploading it (writes nothing into it)")
    export.add_argument("path", help="the export folder: part-*.parquet and its marker")
    export.add_argument("--dataset", help="the dataset to check it as (default: the name of "
                        "the folder's parent, as in <dataset>/<export-id>/)")
    export.add_argument("--config", help="TOML config (default: the bundled demo's)")
    export.set_defaults(func=cmd_check_export)
    demo = sub.add_parser("demo", help="write the next demo export (watch a swap happen)")
    demo.add_argument(
        "--root", default="duckswap-demo", help="source folder (default ./duckswap-demo)"
    )
    demo.add_argument("--size", choices=["default", "medium", "small"], default="default")
    demo.add_argument("--seq", type=_number(1, 999_999), default=None,
                      help="export number (default: next)")
    demo.add_argument("--manifest", action="store_true", help="write _manifest.json, not _SUCCESS")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
