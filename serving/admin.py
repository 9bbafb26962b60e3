"""The admin API's HTTP side: `/admin/...`, only routed when `server.admin_token` is set. Every
request wants `Authorization: Bearer <token>` (compared in constant time; a refusal is logged)
and is then answered by the loader (`loaders.admin`), where the state is."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging

from aiohttp import web

from engine.errors import Unauthorized
from serving.handlers import STATUS_CONTENT_TYPE
from serving.link import LOADER

log = logging.getLogger("duckswap.admin")


def add_routes(app: web.Application, token: str) -> None:
    want = hashlib.sha256(token.encode()).digest()

    def check(request: web.Request, browser: bool = False) -> None:
        """The token, as a bearer token or (for a browser, at `/admin/status`) as the password
        of HTTP Basic with any user name."""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        secret = given.strip()
        if scheme.lower() == "basic":
            try:
                secret = base64.b64decode(secret, validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                secret = ""
        # Hashing first makes the comparison constant-time in the token's length too.
        got = hashlib.sha256(secret.encode()).digest()
        if scheme.lower() not in ("bearer", "basic") or not hmac.compare_digest(got, want):
            log.warning("admin: refused %s %s from %s: %s token", request.method,
                        request.path, request.remote, "wrong" if given else "no")
            err = Unauthorized("admin routes need `Authorization: Bearer "
                               "<server.admin_token>` (or Basic, the token as the password)")
            if browser:  # the status page: a browser asks for the token
                err.headers["WWW-Authenticate"] = 'Basic realm="duckswap-admin", charset="UTF-8"'
            raise err

    async def page(request: web.Request) -> web.Response:
        check(request, browser=True)
        body = await request.app[LOADER].page(True)
        return web.Response(body=body, headers={"Content-Type": STATUS_CONTENT_TYPE,
                                                "Cache-Control": "no-store"})

    async def forward(request: web.Request) -> web.Response:
        check(request)
        body = await request.read() if request.can_read_body else None
        status, doc = await request.app[LOADER].admin(request.method, request.path, body,
                                                      request.remote)
        return web.json_response(doc, status=status, headers={"Cache-Control": "no-store"},
                                 dumps=lambda o: json.dumps(o, indent=1))

    app.router.add_get("/admin/status", page)
    app.router.add_route("*", "/admin", forward)
    app.router.add_route("*", "/admin/{tail:.*}", forward)
