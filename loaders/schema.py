"""What a dataset must look like: lookup key and required, typed columns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSchema:
    name: str
    key: tuple[str, ...]
    columns: Mapping[str, str]
    required: bool = True


class LoadError(Exception):
    """An export that cannot become a version; the message is the reason shown to operators."""


class Unavailable(Exception):
    """The source could not be read right now (an outage, an export still changing): not the
    export's fault, so it is tried again later instead of being refused."""
