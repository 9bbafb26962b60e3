"""The admin API: what each dataset serves and why, and the actions an operator needs.

Only routed when `server.admin_token` is set; every route wants `Authorization: Bearer
<token>` (compared in constant time). Every action, and every refused attempt, is logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from engine.errors import BadParameter, Conflict, NotFound, SourceUnavailable, Unauthorized
from loaders.state import Refusal, VersionRecord
from loaders.updater import LoadEvent, NotKept, Updater

log = logging.getLogger("duckswap.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UPDATER_KEY = web.AppKey("admin_updater", Updater)
HISTORY = 20  # load events shown per dataset


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _record(r: VersionRecord) -> dict[str, Any]:
    return {"version": r.version_id, "export_id": r.export_id, "rows": r.rows,
            "loaded_at": _iso(r.loaded_at), "timings_s": r.timings}


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
    served = updater.store.current.versions.get(name)
    record = ds.find(served.version_id) if served is not None else None
    age = updater.data_age().get(name)
    return {
        "name": name,
        "group": group.name if (group := updater.group_of.get(name)) else None,
        "served": _record(record) if record is not None else None,
        "data_age_s": age,
        "pinned": ds.pinned,
        "kept": [_record(r) for r in list(ds.versions)],
        "pending": updater.pending_exports(name),
        "quarantined": [_refusal(q) for q in sorted(ds.quarantine.values(),
                                                     key=lambda q: q.at, reverse=True)],
        "history": [_event(e) for e in list(updater.history)[::-1] if e.dataset == name][
            :HISTORY],
        "actions": [a for a in list(updater.actions)[::-1] if a["dataset"] in (name, None)],
    }


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"},
                             dumps=lambda o: json.dumps(o, indent=1))


def _guard(token: str, handler: Handler) -> Handler:
    want = hashlib.sha256(token.encode()).digest()

    async def guarded(request: web.Request) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # Hashing first makes the comparison constant-time in the token's length too.
        got = hashlib.sha256(given.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(got, want):
            log.warning("admin: refused %s %s from %s: %s token", request.method,
                        request.path, request.remote, "wrong" if given else "no")
            raise Unauthorized("admin routes need `Authorization: Bearer <server.admin_token>`")
        return await handler(request)

    return guarded


def _dataset(request: web.Request) -> str:
    name = request.match_info["dataset"]
    if name not in request.app[UPDATER_KEY].state:
        raise NotFound(f"no dataset {name!r}", dataset=name)
    return name


async def _body(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json(loads=json.loads)
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


async def list_datasets(request: web.Request) -> web.Response:
    updater = request.app[UPDATER_KEY]
    listed = updater.last_listed
    return _json({
        "source": {"url": updater.source.url, "errors": updater.source_errors,
                   "problem": updater.source_problem,
                   "last_listed_age_s": round(time.time() - listed, 3) if listed else None},
        "keep_versions": updater.keep_versions,
        "datasets": [dataset_doc(updater, n) for n in sorted(updater.state)],
        "incomplete_runs": updater.incomplete_runs(),
    })


async def show_dataset(request: web.Request) -> web.Response:
    return _json(dataset_doc(request.app[UPDATER_KEY], _dataset(request)))


async def _version_action(request: web.Request, action: str) -> web.Response:
    updater = request.app[UPDATER_KEY]
    name = _dataset(request)
    version = (await _body(request, ("version",))).get("version")
    fn = updater.rollback if action == "rollback" else updater.pin
    try:
        record = await updater.act(fn, name, version)
    except NotKept as exc:
        updater.record_action(action, name, version=version, by=request.remote,
                              refused=str(exc))
        raise Conflict(str(exc), dataset=name) from None
    updater.record_action(action, name, version=record.version_id,
                          export_id=record.export_id, by=request.remote)
    return _json({"action": action, "dataset": dataset_doc(updater, name)})


async def rollback(request: web.Request) -> web.Response:
    return await _version_action(request, "rollback")


async def pin(request: web.Request) -> web.Response:
    return await _version_action(request, "pin")


async def _loading_action(request: web.Request, action: str, name: str | None,
                          call: Callable[[], list[LoadEvent]]) -> web.Response:
    updater = request.app[UPDATER_KEY]
    updater.record_action(action, name, by=request.remote)
    try:
        events = await updater.act(call)
    except Exception as exc:  # the source could not be listed: nothing changed
        raise SourceUnavailable(f"listing {updater.source.url} failed "
                                f"({type(exc).__name__}); the served data is unchanged and "
                                "the watcher tries again at its next poll") from None
    names = [name] if name is not None else sorted(updater.state)
    return _json({"action": action, "loads": [_event(e) for e in events],
                  "datasets": [dataset_doc(updater, n) for n in names]})


async def unpin(request: web.Request) -> web.Response:
    updater = request.app[UPDATER_KEY]
    name = _dataset(request)
    await _body(request, ())
    return await _loading_action(request, "unpin", name, lambda: updater.unpin(name))


async def reload(request: web.Request) -> web.Response:
    updater = request.app[UPDATER_KEY]
    name = _dataset(request) if "dataset" in request.match_info else None
    retry = bool((await _body(request, ("retry_quarantined",))).get("retry_quarantined"))
    return await _loading_action(request, "reload", name, lambda: updater.reload(name, retry))


def add_routes(app: web.Application, token: str, updater: Updater) -> None:
    app[UPDATER_KEY] = updater
    for method, path, handler in (
        ("GET", "/admin/datasets", list_datasets),
        ("GET", "/admin/datasets/{dataset}", show_dataset),
        ("POST", "/admin/datasets/{dataset}/rollback", rollback),
        ("POST", "/admin/datasets/{dataset}/pin", pin),
        ("POST", "/admin/datasets/{dataset}/unpin", unpin),
        ("POST", "/admin/datasets/{dataset}/reload", reload),
        ("POST", "/admin/reload", reload),
    ):
        app.router.add_route(method, path, _guard(token, handler))
