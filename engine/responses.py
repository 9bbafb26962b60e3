"""Encoded endpoint responses: version tokens, ETags and the bytes every path serves.

A response is a pure function of (endpoint spec, versions of the datasets it reads, normalised
parameters), so it is computed once and served as bytes: from the cache, after a warm, or from a
query. All three paths encode through `BodyEncoder`, so they are byte-identical.
"""

from __future__ import annotations

import decimal
import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from engine.endpoints import EndpointSpec

if TYPE_CHECKING:
    from engine.store import Snapshot

IMMUTABLE = "public, max-age=31536000, immutable"
NO_STORE = "no-store"
# `/v1/version`: a second behind at most, and a CDN still answers most of the polls.
VERSION_CACHE_CONTROL = "public, max-age=1"
TOKEN_LENGTH = 16


def _default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    return str(value)


def dumps(body: Any) -> bytes:
    return orjson.dumps(body, default=_default, option=orjson.OPT_NON_STR_KEYS)


def _digest(data: bytes, size: int) -> str:
    return hashlib.blake2b(data, digest_size=size).hexdigest()


def fingerprint(spec: EndpointSpec) -> bytes:
    """Everything about an endpoint that shapes its answers; a config change changes tokens."""
    params = {n: repr(p) for n, p in spec.params.items()}
    return dumps([spec.name, spec.sql, spec.datasets, spec.row_limit, params])


def token(spec_fingerprint: bytes, versions: Mapping[str, str]) -> str:
    """The endpoint's version token: it changes only when a dataset it reads changes."""
    parts = "\n".join(f"{d}={v}" for d, v in sorted(versions.items())).encode()
    return _digest(spec_fingerprint + b"\0" + parts, TOKEN_LENGTH // 2)


def endpoint_tokens(endpoints: Mapping[str, EndpointSpec], fingerprints: Mapping[str, bytes],
                    snap: Snapshot) -> dict[str, str]:
    """Token of every endpoint whose datasets are all loaded in `snap`."""
    tokens = {}
    for name, spec in endpoints.items():
        versions = snap.version_ids(spec.datasets)
        if len(versions) == len(spec.datasets):
            tokens[name] = token(fingerprints[name], versions)
    return tokens


def etag(version_token: str, key: tuple[Any, ...]) -> str:
    """Strong validator: version token plus normalised parameters."""
    return key_etag(version_token, dumps(key))


def key_etag(version_token: str, encoded_key: bytes) -> str:
    """`etag` of a cache key already encoded (`dumps(key)`: an answers file's key)."""
    return f'"{version_token}-{_digest(encoded_key, 8)}"'


class BodyEncoder:
    """The JSON body of one endpoint version's answers: its `meta` part (all but the row count) is
    encoded once, so answering 10^5 keys in a warm costs the rows' encoding only. The bytes
    are exactly those of `dumps({"data": [...], "meta": {...}})` (orjson writes no spaces)."""

    __slots__ = ("_meta", "meta")

    def __init__(self, spec: EndpointSpec, version_token: str,
                 versions: Mapping[str, str]) -> None:
        meta = dumps({"endpoint": spec.name, "token": version_token, "versions": dict(versions)})
        self._meta = b',"meta":' + meta[:-1] + b',"rows":'
        self.meta = {"duckswap.endpoint": spec.name, "duckswap.token": version_token}

    def __call__(self, columns: list[str], rows: list[tuple[Any, ...]], truncated: bool) -> bytes:
        data = dumps([dict(zip(columns, row, strict=True)) for row in rows])
        return b"".join((b'{"data":', data, self._meta, str(len(rows)).encode(),
                         b',"truncated":true}}' if truncated else b',"truncated":false}}'))


# One cached response: (body, ETag, X-Duckswap-Versions). A plain tuple of bytes and strings
# on purpose: the cyclic GC untracks such a tuple (and its cache key) at its first collection,
# so 10^5 cached responses cost the collector nothing. Instances of a class stay tracked, and
# every full collection walked all of them.
Entry = tuple[bytes, str, str]


ENTRY_OVERHEAD = 350  # bytes of an entry's Python objects and key, measured


def entry_size(entry: Entry) -> int:
    """Bytes held, Python object overheads and the key included."""
    return len(entry[0]) + len(entry[1]) + ENTRY_OVERHEAD


def versions_header(versions: Mapping[str, str]) -> str:
    return ",".join(f"{d}={v}" for d, v in versions.items())


def if_none_match(header: str | None, current: str) -> bool:
    """RFC 9110 weak comparison for If-None-Match: `*`, a list, `W/` prefixes."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    for part in header.split(","):
        tag = part.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == current:
            return True
    return False
