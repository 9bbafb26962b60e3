"""The request mix: weighted endpoints, Zipf-like champion popularity."""

from __future__ import annotations

import itertools
import random
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MIX = Path(__file__).with_name("mix.toml")


@dataclass(frozen=True)
class Entry:
    name: str
    weight: float
    path: str
    unique: str | None


class Mix:
    def __init__(self, file: Path, champions: int | None = None, unique: bool = False,
                 seed: int = 1, unique_from: int = 1) -> None:
        doc = tomllib.loads(file.read_text())
        self.entries = [Entry(r["name"], float(r["weight"]), r["path"], r.get("unique"))
                        for r in doc["request"]]
        self.champions = int(champions or doc["champions"])
        self.unique = unique
        self.rng = random.Random(seed)
        self.counter = itertools.count(unique_from)
        zipf = float(doc.get("zipf", 1.0))
        ids = list(range(1, self.champions + 1))
        self._champ_ids = ids
        self._champ_w = [1.0 if unique else 1.0 / (i ** zipf) for i in ids]
        self._choices = {k: (list(v), [1.0 if unique else float(w) for w in v.values()])
                         for k, v in (("role", doc["roles"]), ("rank", doc["ranks"]),
                                      ("region", doc["regions"]))}

    def next(self) -> tuple[str, str]:
        """(entry name, URL path with query) for the next request."""
        rng = self.rng
        e = rng.choices(self.entries, [x.weight for x in self.entries])[0]
        champ, opp = rng.choices(self._champ_ids, self._champ_w, k=2)
        if opp == champ:
            opp = champ % self.champions + 1
        values = {k: rng.choices(v, w)[0] for k, (v, w) in self._choices.items()}
        url = e.path.format(champion=champ, opponent=opp, **values)
        if self.unique and e.unique:
            url += ("&" if "?" in url else "?") + f"{e.unique}={next(self.counter)}"
        return e.name, url
