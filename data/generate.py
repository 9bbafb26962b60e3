"""Deterministic generator of realistic game-stats exports, laid out as a PySpark job writes them.

`<root>/<dataset>/export-<seq>/part-0000N.parquet` written one by one, then `_SUCCESS`
(or `_manifest.json` with sizes, row counts and sha256). The same (seq, size) always gives the
same files. Stats drift a little with `seq`, so a new export visibly changes the numbers, and
every row carries `export_seq`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb

from loaders.source import MARKERS

REGIONS = ["na", "euw", "eune", "kr", "br", "jp", "lan", "las", "oce", "tr"]
RANKS = ["iron", "bronze", "silver", "gold", "platinum", "emerald", "diamond", "master",
         "grandmaster", "challenger"]
ROLES = ["top", "jungle", "mid", "bot", "support"]
DATASETS = ("patches", "champions", "champion_stats", "champion_builds", "matchups")
# The demo config's lookup keys: each export is range-partitioned and sorted by its key, as a
# Spark job does with `repartitionByRange(key).sortWithinPartitions(key)`, so duckswap's build
# finds it in order and skips the sort.
SORT_KEYS = {
    "patches": ("patch",),
    "champions": ("champion_id",),
    "champion_stats": ("role", "champion_id", "patch", "region", "rank_tier"),
    "champion_builds": ("champion_id", "role", "patch"),
    "matchups": ("champion_id", "opponent_id", "role", "patch"),
}
_SYLLABLES = ["ka", "zar", "lu", "mor", "vi", "ash", "en", "tho", "ry", "na", "gal", "io",
              "sek", "dra", "ul", "fen", "qi", "ros", "ta", "bel"]


@dataclass(frozen=True)
class Size:
    champions: int
    patches: int
    regions: int
    ranks: int
    parts: int
    matchup_patches: int


SIZES = {
    # 30 x 10 x 10 x 5 x 170 = 2,550,000 champion_stats rows
    "default": Size(champions=170, patches=30, regions=10, ranks=10, parts=4, matchup_patches=3),
    "medium": Size(champions=60, patches=10, regions=5, ranks=5, parts=2, matchup_patches=2),
    "small": Size(champions=12, patches=3, regions=2, ranks=5, parts=2, matchup_patches=2),
}


def patch_names(n: int) -> list[str]:
    """Two patch lines a year, 24 patches each: 25.01 ... 25.24, 26.01 ..."""
    return [f"{25 + i // 24}.{i % 24 + 1:02d}" for i in range(n)]


def champion_name(i: int) -> str:
    """Unique for i < 400: the first two syllables encode (i % 20, i // 20)."""
    a, b = i % 20, i // 20
    tail = _SYLLABLES[(a * 7 + 5) % 20] if a % 3 else ""
    return (_SYLLABLES[a] + _SYLLABLES[(3 * b + a) % 20] + tail).capitalize()


def _values(items: list[str]) -> str:
    return ", ".join(f"({i}, '{v}')" for i, v in enumerate(items))


def _rand(seed: str) -> str:
    """A deterministic uniform [0, 1) from a hash of the given SQL expressions."""
    return f"((hash({seed}) % 1000003)::DOUBLE / 1000003)"


def _setup(con: duckdb.DuckDBPyConnection, size: Size, seq: int) -> None:
    patches = patch_names(size.patches)
    con.execute(
        f"CREATE TEMP TABLE patch_d AS SELECT * FROM (VALUES {_values(patches)}) t(pi, patch)"
    )
    con.execute(
        f"CREATE TEMP TABLE region_d AS SELECT * FROM (VALUES {_values(REGIONS[: size.regions])})"
        " t(gi, region)"
    )
    con.execute(
        f"CREATE TEMP TABLE rank_d AS SELECT * FROM (VALUES {_values(RANKS[: size.ranks])})"
        " t(ri, rank_tier)"
    )
    con.execute(f"CREATE TEMP TABLE role_d AS SELECT * FROM (VALUES {_values(ROLES)}) t(oi, role)")
    names = ", ".join(f"({i + 1}, '{champion_name(i)}')" for i in range(size.champions))
    con.execute(f"CREATE TEMP TABLE champ_d AS SELECT * FROM (VALUES {names}) t(champion_id, name)")
    # Zipf-like popularity per champion, and a main role with a couple of off-roles.
    con.execute(
        "CREATE TEMP TABLE pop AS SELECT champion_id, 1.0 / (1 + (champion_id * 37 % "
        f"{size.champions})) ** 0.9 AS pop, champion_id % 5 AS main_role FROM champ_d"
    )
    con.execute(f"SET VARIABLE seq = {seq}")


def _stats_sql(size: Size) -> str:
    r1 = _rand("p.pi, g.gi, r.ri, o.oi, c.champion_id, getvariable('seq')")
    r2 = _rand("c.champion_id, p.pi, o.oi, 'wr'")
    r3 = _rand("p.pi, g.gi, r.ri, o.oi, c.champion_id, getvariable('seq'), 'k'")
    return f"""
    SELECT patch, region, rank_tier, role, champion_id, games,
           CAST(round(games * (0.44 + 0.12 * r2 + 0.01 * (r1 - 0.5))) AS BIGINT) AS wins,
           CAST(round(games * (0.02 + 0.3 * r3)) AS BIGINT) AS bans,
           round(3 + 6 * r3, 2) AS avg_kills,
           round(3 + 4 * r1, 2) AS avg_deaths,
           round(4 + 8 * r2, 2) AS avg_assists,
           getvariable('seq')::INTEGER AS export_seq
    FROM (
      SELECT p.patch, g.region, r.rank_tier, o.role, c.champion_id,
             {r1} AS r1, {r2} AS r2, {r3} AS r3,
             CAST(20 + floor(pop.pop * (CASE WHEN o.oi = pop.main_role THEN 40000 ELSE 2500 END)
                  * (0.7 + 0.6 * {r1}) * (1.3 - r.ri / 10.0)) + getvariable('seq') AS BIGINT)
                  AS games
      FROM patch_d p, region_d g, rank_d r, role_d o, champ_d c JOIN pop USING (champion_id)
    )"""


def _builds_sql() -> str:
    r = _rand("p.pi, o.oi, c.champion_id, b.bi, getvariable('seq')")
    items = ", ".join(f"(3000 + (hash(c.champion_id, b.bi, {k}) % 200))::INTEGER" for k in range(3))
    return f"""
    SELECT p.patch, o.role, c.champion_id, b.bi + 1 AS build_rank,
           [{items}] AS items,
           CAST(50 + floor(pop.pop * 20000 * {r} / (b.bi + 1)) AS BIGINT) AS games,
           CAST(round((50 + floor(pop.pop * 20000 * {r} / (b.bi + 1))) * (0.45 + 0.1 * {r}))
                AS BIGINT) AS wins,
           getvariable('seq')::INTEGER AS export_seq
    FROM patch_d p, role_d o, range(8) b(bi), champ_d c JOIN pop USING (champion_id)"""


def _matchups_sql(size: Size) -> str:
    r = _rand("p.pi, o.oi, c.champion_id, e.champion_id, getvariable('seq')")
    return f"""
    SELECT p.patch, o.role, c.champion_id, c.name AS champion, e.champion_id AS opponent_id,
           e.name AS opponent, CAST(30 + floor(1000 * {r}) AS BIGINT) AS games,
           CAST(round((30 + floor(1000 * {r})) * (0.4 + 0.2 * {r})) AS BIGINT) AS wins,
           getvariable('seq')::INTEGER AS export_seq
    FROM patch_d p, role_d o, champ_d c, champ_d e
    WHERE p.pi >= {size.patches - size.matchup_patches} AND c.champion_id <> e.champion_id"""


def _patches_sql() -> str:
    """The patch calendar: overlays look up the latest patch here, not by scanning stats."""
    return """
    SELECT patch, pi + 1 AS release_index, getvariable('seq')::INTEGER AS export_seq
    FROM patch_d"""


def _champions_sql() -> str:
    return """
    SELECT champion_id, name, getvariable('seq')::INTEGER AS export_seq
    FROM champ_d"""


def export_id(seq: int) -> str:
    return f"export-{seq:06d}"


def _write_dataset(
    con: duckdb.DuckDBPyConnection, folder: Path, sql: str, parts: int, manifest: bool,
    key: tuple[str, ...],
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, int | str]] = []
    order = ", ".join(key)
    con.execute(f"CREATE OR REPLACE TEMP TABLE __export AS SELECT *, "
                f"row_number() OVER (ORDER BY {order}) - 1 AS __rn FROM ({sql})")
    total_row = con.execute("SELECT count(*) FROM __export").fetchone()
    total = int(total_row[0]) if total_row else 0
    for part in range(parts):
        final = folder / f"part-{part:05d}.parquet"
        tmp = folder / f"part-{part:05d}.parquet.part"
        lo, hi = total * part // parts, total * (part + 1) // parts
        con.execute(
            f"COPY (SELECT * EXCLUDE (__rn) FROM __export WHERE __rn >= {lo} AND __rn < {hi} "
            f"ORDER BY __rn) TO '{tmp}' (FORMAT parquet, COMPRESSION zstd)"
        )
        tmp.rename(final)
        rows = con.execute(f"SELECT count(*) FROM read_parquet('{final}')").fetchone()
        entries.append({
            "path": final.name,
            "size": final.stat().st_size,
            "rows": int(rows[0]) if rows else 0,
            "sha256": hashlib.sha256(final.read_bytes()).hexdigest(),
        })
    if manifest:
        doc = {"files": entries, "rows": sum(int(e["rows"]) for e in entries)}
        (folder / "_manifest.json.part").write_text(json.dumps(doc, indent=2))
        (folder / "_manifest.json.part").rename(folder / "_manifest.json")
    else:
        (folder / "_SUCCESS").write_bytes(b"")


def write_export(
    root: Path,
    seq: int,
    size: str = "default",
    datasets: tuple[str, ...] = DATASETS,
    manifest: bool = False,
) -> dict[str, Path]:
    """Write export `seq` of each dataset under `root`; returns dataset -> export folder."""
    dims = SIZES[size]
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    try:
        _setup(con, dims, seq)
        sqls = {
            "patches": _patches_sql(),
            "champions": _champions_sql(),
            "champion_stats": _stats_sql(dims),
            "champion_builds": _builds_sql(),
            "matchups": _matchups_sql(dims),
        }
        out = {}
        for name in datasets:
            folder = root / name / export_id(seq)
            _write_dataset(con, folder, sqls[name], dims.parts, manifest, SORT_KEYS[name])
            out[name] = folder
        return out
    finally:
        con.close()


def missing_demo(root: Path) -> list[str]:
    """The demo datasets with no complete export under `root`."""
    return [d for d in DATASETS if not any(any((root / d).glob(f"*/{m}")) for m in MARKERS)]


def write_first_demo(root: Path, datasets: list[str], size: str = "default") -> None:
    """Write the first demo export of `datasets` under `root`. Each is written aside and
    renamed into place whole, so a stop halfway leaves nothing half-written that the next
    start would take as done."""
    aside = root.parent / f".{root.name}.writing"
    shutil.rmtree(aside, ignore_errors=True)
    try:
        for name, folder in write_export(aside, 1, size, tuple(datasets)).items():
            target = root / name / folder.name
            shutil.rmtree(target, ignore_errors=True)  # a folder a stop left half-written
            target.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(target)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def next_seq(root: Path) -> int:
    """One past the highest export sequence found under root."""
    seqs = [int(m.group(1)) for p in root.glob("*/export-*")
            if (m := re.fullmatch(r"export-(\d+)", p.name))]
    return max(seqs, default=0) + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--manifest", action="store_true")
    args = parser.parse_args(argv)
    seq = args.seq if args.seq is not None else next_seq(args.root)
    for name, folder in write_export(args.root, seq, args.size, manifest=args.manifest).items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
