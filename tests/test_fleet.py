"""A fleet: two replicas, each with its own data dir, watching one source behind a real HAProxy
(Debian's package, installed here where missing), all on loopback, under open-loop load while a
new export arrives every 3 s; a rolling restart, then a kill -9 (`bench/fleet.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fleet import scenario
from conftest import REPO


@pytest.mark.timeout(400)  # ~75 s; the first run may install HAProxy
def test_two_replicas_behind_haproxy_lose_no_request_and_agree_on_every_id(
        tmp_path: Path) -> None:
    r = scenario(tmp_path, duration=45, rate=300, every=3,
                 haproxy_cfg=REPO / "deploy" / "haproxy" / "haproxy.cfg")
    assert r["harness_errors"] == [], r["harness_errors"]
    # no request fails: not while exports swap, not during a rolling restart, and a kill -9
    # costs at most the requests that replica had in flight (HAProxy sends those again)
    assert r["failed_elsewhere"] == 0, r
    assert r["failed_in_rolling_restart"] == 0, r
    assert r["failed_in_kill"] <= r["in_flight_at_kill"], r
    # HAProxy's health check took the killed replica out, and back in once it was restarted
    assert r["kill_marked_down_s"] < 2.0, r
    assert r["haproxy"]["r1"]["status"] == "UP" and int(r["haproxy"]["r1"]["chkdown"]) >= 2, r
    # both replicas served the exports, naming each with the same version id and each endpoint
    # with the same token
    # (a replica that restarts loads the newest export, and may skip one written meanwhile)
    assert r["exports_missed"] == [], r
    assert r["exports_served_by_both"] >= 5, r
    assert r["version_ids_compared"] >= 5 * r["exports_served_by_both"], r
    assert r["version_ids_differing"] == [], r["version_ids_differing"]
    assert r["token_sets_compared"] >= r["exports_served_by_both"], r
    assert r["tokens_differing"] == [], r["tokens_differing"]
    # `?v=` through the balancer: that version's bytes (the same whichever replica answers),
    # or the 307 to the current token for a version the replica does not hold; nothing else
    assert r["versioned"]["wrong"] == [], r["versioned"]
    assert r["versioned"]["exact"] > 1000, r["versioned"]
