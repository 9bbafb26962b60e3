"""The admin API's loader side: what each dataset serves and why, and the actions an operator
needs. A worker checks the bearer token (`serving.admin`) and hands the request over;
`handle` answers it here, where the state is.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from engine.errors import (
    ApiError,
    BadParameter,
    Conflict,
    MethodNotAllowed,
    NotFound,
    SourceUnavailable,
)
from loaders.state import Refusal, VersionRecord
from loaders.updater import LoadEvent, NotKept, Updater

HISTORY = 20  # load events shown per dataset


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _record(r: VersionRecord) -> dict[str, Any]:
    return {"version": r.version_id, "export_id": r.export_id, "rows": r.rows,
            "loaded_at": _iso(r.loaded_at),
            "written_at": _iso(r.written_at) if r.written_at else None, "timings_s": r.timings}


def _refusal(q: Refusal) -> dict[str, Any]:
    return {"export_id": q.export_id, "reason": q.reason, "at": _iso(q.at)}


def _event(e: LoadEvent) -> dict[str, Any]:
    return {"at": _iso(e.at), "export_id": e.export_id, "outcome": e.outcome,
            "version": e.version_id, "reason": e.reason or None, "seconds": round(e.seconds, 4),
            "timings_s": {k: round(v, 4) for k, v in e.timings.items()}}


def dataset_doc(updater: Updater, name: str) -> dict[str, Any]:
    """Read on the event loop while the loader thread may update the state: every container
    is copied whole (one C call, atomic under the GIL) before it is iterated."""
    ds = updater.state[name]
    served = updater.catalog.current.versions.get(name)
    record = ds.find(served.version_id) if served is not None else None
    age = updater.data_age().get(name)
    return {
        "name": name,
        "group": group.name if (group := updater.group_of.get(name)) else None,
        "served": _record(record) if record is not None else None,
        "data_age_s": age,
        "export_age_s": updater.export_age_of(name),
        "pinned": ds.pinned,
        "export_from_config": updater.config_export(name),
        "config_problem": updater.config_problems.get(updater.group(name).name),
        "kept": [_record(r) for r in list(ds.versions)],
        "pending": updater.pending_exports(name),
        "quarantined": [_refusal(q) for q in sorted(ds.quarantine.values(),
                                                     key=lambda q: q.at, reverse=True)],
        "history": [_event(e) for e in list(updater.history)[::-1] if e.dataset == name][
            :HISTORY],
        "actions": [a for a in list(updater.actions)[::-1] if a["dataset"] in (name, None)],
    }


def _dataset(updater: Updater, name: str) -> str:
    if name not in updater.state:
        raise NotFound(f"no dataset {name!r}", dataset=name)
    return name


def _body(raw: bytes | None, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadParameter("body: not valid JSON", parameter="body") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadParameter("body: expected a JSON object", parameter="body")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadParameter(f"body: unknown field {unknown[0]!r} (allowed: "
                           f"{', '.join(allowed) or 'none'})", parameter=unknown[0])
    version = body.get("version")
    if version is not None and not isinstance(version, str):
        raise BadParameter("version: expected a version id string", parameter="version")
    retry = body.get("retry_quarantined")
    if retry is not None and not isinstance(retry, bool):
        raise BadParameter("retry_quarantined: expected true or false",
                           parameter="retry_quarantined")
    return body


def list_datasets(updater: Updater) -> dict[str, Any]:
    listed = updater.last_listed
    return {
        "source": {"url": updater.source.url, "errors": updater.source_errors,
                   "problem": updater.source_problem,
                   "last_listed_age_s": round(time.time() - listed, 3) if listed else None},
        "keep_versions": updater.keep_versions,
        "datasets": [dataset_doc(updater, n) for n in sorted(updater.state)],
        "incomplete_runs": updater.incomplete_runs(),
    }


async def _version_action(updater: Updater, action: str, name: str, raw: bytes | None,
                          remote: str | None) -> dict[str, Any]:
    version = _body(raw, ("version",)).get("version")
    fn = updater.rollback if action == "rollback" else updater.pin
    try:
        record = await updater.act(fn, name, version)
    except NotKept as exc:
        updater.record_action(action, name, version=version, by=remote, refused=str(exc))
        raise Conflict(str(exc), dataset=name) from None
    updater.record_action(action, name, version=record.version_id,
                          export_id=record.export_id, by=remote)
    return {"action": action, "dataset": dataset_doc(updater, name)}


async def _loading_action(updater: Updater, action: str, name: str | None,
                          call: Callable[[], list[LoadEvent]],
                          remote: str | None) -> dict[str, Any]:
    updater.record_action(action, name, by=remote)
    try:
        events = await updater.act(call)
    except Exception as exc:  # the source could not be listed: nothing changed
        raise SourceUnavailable(f"listing {updater.source.url} failed "
                                f"({type(exc).__name__}); the served data is unchanged and "
                                "the watcher tries again at its next poll") from None
    names = [name] if name is not None else sorted(updater.state)
    return {"action": action, "loads": [_event(e) for e in events],
            "datasets": [dataset_doc(updater, n) for n in names]}


ROUTE = re.compile(r"^/admin(?:/datasets(?:/(?P<dataset>[^/]+)(?:/(?P<action>[a-z]+))?)?"
                   r"|/(?P<reload>reload))$")
ACTIONS = ("rollback", "pin", "unpin", "reload")


async def handle(updater: Updater, method: str, path: str, body: bytes | None,
                 remote: str | None) -> tuple[int, Any]:
    """Answer one admin request (the token already checked): (HTTP status, JSON document),
    the error shape on failure."""
    try:
        return 200, await _route(updater, method, path, body, remote)
    except ApiError as exc:
        return exc.status, exc.body()


async def _route(updater: Updater, method: str, path: str, body: bytes | None,
                 remote: str | None) -> dict[str, Any]:
    m = ROUTE.match(path)
    if m is None or (m["action"] is not None and m["action"] not in ACTIONS) or (
            path == "/admin"):
        raise NotFound(f"no route for {path}")
    action = "reload" if m["reload"] else m["action"]
    want = "POST" if action else "GET"
    if method != want:
        raise MethodNotAllowed(f"{method} is not allowed on {path}")
    if action is None:
        if m["dataset"] is None:
            return list_datasets(updater)
        return dataset_doc(updater, _dataset(updater, m["dataset"]))
    name = _dataset(updater, m["dataset"]) if m["dataset"] is not None else None
    if action in ("rollback", "pin", "unpin") and (
            named := updater.config_export(name or "")) is not None:
        reason = (f"{name} serves export {named} as its config names it "
                  f"(datasets.{name}.export): change the config to move it")
        updater.record_action(action, name, by=remote, refused=reason)
        raise Conflict(reason, dataset=name)
    if action in ("rollback", "pin"):
        assert name is not None
        return await _version_action(updater, action, name, body, remote)
    if action == "unpin":
        assert name is not None
        _body(body, ())
        return await _loading_action(updater, "unpin", name, lambda: updater.unpin(name),
                                     remote)
    retry = bool(_body(body, ("retry_quarantined",)).get("retry_quarantined"))
    return await _loading_action(updater, "reload", name, lambda: updater.reload(name, retry),
                                 remote)
