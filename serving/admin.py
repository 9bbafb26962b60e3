"""The admin API's HTTP side: `/admin/...`, only routed when `server.admin_token` is set. Every
request wants `Authorization: Bearer <token>` (compared in constant time; a refusal is logged)
and is then answered by the loader (`loaders.admin`), where the state is."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

from aiohttp import web

from engine.errors import Unauthorized
from serving.link import LOADER

log = logging.getLogger("duckswap.admin")


def add_routes(app: web.Application, token: str) -> None:
    want = hashlib.sha256(token.encode()).digest()

    async def forward(request: web.Request) -> web.Response:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # Hashing first makes the comparison constant-time in the token's length too.
        got = hashlib.sha256(given.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(got, want):
            log.warning("admin: refused %s %s from %s: %s token", request.method,
                        request.path, request.remote, "wrong" if given else "no")
            raise Unauthorized("admin routes need `Authorization: Bearer <server.admin_token>`")
        body = await request.read() if request.can_read_body else None
        status, doc = await request.app[LOADER].admin(request.method, request.path, body,
                                                      request.remote)
        return web.json_response(doc, status=status, headers={"Cache-Control": "no-store"},
                                 dumps=lambda o: json.dumps(o, indent=1))

    app.router.add_route("*", "/admin", forward)
    app.router.add_route("*", "/admin/{tail:.*}", forward)
