"""The status page: plain HTML rendered by the loader, whose figures agree with the admin API
and `/metrics`; what only admins see behind the token; rendered by a real headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import shutil
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.debian import debian_program
from conftest import Running, demo_settings, wait_for, write_seq_export
from data.generate import write_export

TOKEN = "status-admin-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
BASIC = {"Authorization": "Basic " + base64.b64encode(f"ops:{TOKEN}".encode()).decode()}
REQUESTS = [
    "/v1/champions/1/stats?role=mid&rank=gold&region=euw",
    "/v1/champions/2/stats?role=top&rank=gold&region=euw",
    "/v1/matchups/1/2?role=mid",
    "/v1/champions/1/builds?role=mid&format=csv",
]


class Figures(HTMLParser):
    """The `data-k` figures of a page: name -> text."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, str] = {}
        self._key: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        key = dict(attrs).get("data-k")
        if key is not None:
            self._key, self._text = key, []

    def handle_data(self, data: str) -> None:
        if self._key is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._key is not None and tag in ("td", "span"):
            self.found[self._key] = "".join(self._text).strip()
            self._key = None


def figures(page: str) -> dict[str, str]:
    parser = Figures()
    parser.feed(page)
    return parser.found


async def _text(srv: Running, path: str, **headers: str) -> tuple[int, Any, str]:
    async with srv.session.get(srv.url(path), headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.text()


@pytest.fixture
async def demo(tmp_path: Path, serve: Any) -> Running:
    write_export(tmp_path, 1, size="small")
    # Datasets published one by one (no group): one dataset's bad export is refused alone.
    srv: Running = await serve(replace(demo_settings(tmp_path), admin_token=TOKEN, groups={}))
    await srv.wait_ready()
    return srv


async def test_the_figures_agree_with_the_admin_api_and_metrics(demo: Running) -> None:
    for path in REQUESTS * 3:
        async with demo.session.get(demo.url(path)) as resp:
            assert resp.status == 200
            await resp.read()
    status, datasets = await demo.get("/admin/datasets", headers=BEARER)
    assert status == 200
    _, _, text = await _text(demo, "/metrics")
    status, headers, page = await _text(demo, "/status")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    found = figures(page)
    for d in datasets["datasets"]:
        name, served = d["name"], d["served"]
        assert found[f"{name}.version"] == served["version"]
        assert found[f"{name}.export_id"] == served["export_id"]
        assert found[f"{name}.rows"] == str(served["rows"])
        assert found[f"{name}.refused"] == str(len(d["quarantined"]))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    lookups: dict[tuple[str, str], float] = {
        (s.labels["endpoint"], s.labels["result"]): s.value
        for s in families["duckswap_cache_lookups"].samples}
    hits = sum(v for (_, r), v in lookups.items() if r == "hit")
    total = sum(lookups.values())
    assert found["hit_ratio"] == f"{hits / total:.4f}"
    counts = {s.labels["endpoint"]: s.value
              for s in families["duckswap_request_duration_seconds"].samples
              if s.name.endswith("_count")}
    assert counts["champion_stats"] == 6 and counts["matchup"] == 3
    for endpoint, n in counts.items():
        assert found[f"{endpoint}.requests"] == str(int(n))
    assert found["champion_stats.rate"] == f"{6 / 60:.1f}/s"
    assert found["champion_stats.p99"].startswith("≤ ") and found["champion_stats.p99"] != "-"
    assert found["tier_list.p50"] == "-"  # no request in the last minute
    assert found["workers"] == "1" and found["restarts"] == "0"


async def test_what_only_admins_see_stays_behind_the_token(demo: Running, tmp_path: Path
                                                           ) -> None:
    """A refused export's reason and the source's URL: on `/admin/status` (the token as a
    bearer token, or as a browser sends it, HTTP Basic), not on `/status`. A pending export
    is on both."""
    write_export(tmp_path, 2, size="small", datasets=("patches",))
    part = next((tmp_path / "patches" / "export-000002").glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:-40])  # refused: not a readable Parquet file
    pending = tmp_path / "champions" / "export-000003"
    pending.mkdir(parents=True)
    write_seq_export(tmp_path / "elsewhere", 1)  # a part file to copy in, no marker
    shutil.copy(next((tmp_path / "elsewhere" / "seqdata" / "export-000001").glob("*.parquet")),
                pending / "part-00000.parquet")

    async def shown() -> bool:
        found = figures((await _text(demo, "/status"))[2])
        return found.get("patches.refused") == "1" and "export-000003" in found.get(
            "champions.pending", "")

    await wait_for(shown, 30, "the refusal and the pending export on /status")
    _, _, public = await _text(demo, "/status")
    assert "not a readable Parquet file" not in public and str(tmp_path) not in public
    for headers in (BEARER, BASIC):
        status, _, page = await _text(demo, "/admin/status", **headers)
        assert status == 200 and "admin view" in page
        assert "not a readable Parquet file" in page and str(tmp_path) in page
    status, headers, _ = await _text(demo, "/admin/status")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    status, _, _ = await _text(demo, "/admin/status", Authorization="Basic "
                               + base64.b64encode(b"ops:wrong-token-0123456789").decode())
    assert status == 401


async def test_without_a_token_there_is_no_admin_view(tmp_path: Path, serve: Any) -> None:
    write_export(tmp_path, 1, size="small")
    srv: Running = await serve(demo_settings(tmp_path))
    await srv.wait_ready()
    assert (await _text(srv, "/admin/status", **BEARER))[0] == 404
    status, _, page = await _text(srv, "/")
    assert status == 200 and "duckswap status" in page


@pytest.mark.timeout(900)  # the first run may install chromium
async def test_a_real_headless_chromium_renders_it(demo: Running, tmp_path: Path) -> None:
    """The page as a browser shows it: Chromium, headless, offline (no asset from anywhere
    else), its DOM holds every dataset and endpoint, and a screenshot is taken."""
    async with demo.session.get(demo.url("/v1/champions/1/stats?role=mid&rank=gold&region=euw")
                                ) as resp:
        assert resp.status == 200
    base = [debian_program(("chromium", "chromium-browser", "google-chrome"), "chromium"),
            "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={tmp_path / 'ch'}"]
    dom = await asyncio.create_subprocess_exec(
        *base, "--dump-dom", demo.url("/status"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(dom.communicate(), 90)
    assert dom.returncode == 0, err.decode()[-2000:]
    found = figures(out.decode())
    for name in ("patches", "champions", "champion_stats", "champion_builds", "matchups"):
        assert found[f"{name}.export_id"] == "export-000001", name
    assert found["champion_stats.requests"] == "1"
    shot = tmp_path / "status.png"
    png = await asyncio.create_subprocess_exec(
        *base, f"--screenshot={shot}", "--window-size=1280,1500", "--hide-scrollbars",
        demo.url("/status"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(png.communicate(), 90)
    assert png.returncode == 0, err.decode()[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
