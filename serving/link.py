"""What a worker asks of the loader: admin requests, the `/metrics` document, and word that it
has drained old Snapshots. In `duckswap serve` it travels over the worker's control socket
(`serving.worker`); in one process (`serving.app.create_app`) it is a call."""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web


class LoaderLink(Protocol):
    async def admin(self, method: str, path: str, body: bytes | None,
                    remote: str | None) -> tuple[int, Any]:
        """Answer an admin request whose token the worker checked: (status, JSON document)."""

    async def metrics(self) -> tuple[bytes, str]:
        """The `/metrics` document and its content type."""

    async def page(self, admin: bool) -> bytes:
        """The status page's HTML; `admin`: with what only admins see."""

    def drained(self, snap_ids: list[int]) -> None:
        """This worker dropped these Snapshots: no request of its reads them any more."""


LOADER = web.AppKey("loader", LoaderLink)
