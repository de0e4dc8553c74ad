"""Which actor serves which stream: rendezvous (highest-random-weight) hashing.

Each stream goes to the candidate with the highest `weight` of ``(candidate, stream)``, a stable
hash, so the assignment depends only on the stream and the set of candidates: the same in every
run and on every process, and when a candidate leaves only its own streams move (each to its
next-highest candidate), while adding one takes from each of the others about its share. A
stream pinned to a node is hashed over the candidates on that node only. Used for the source
pool actors; the same function places streams on model replicas.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from pipeline.errors import ConfigError


def weight(candidate: str, key: str) -> int:
    """The rendezvous weight of ``key`` on ``candidate``: a 64-bit stable hash of both."""
    digest = hashlib.blake2b(f"{candidate}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous(key: str, candidates: list[str]) -> str:
    """The candidate ``key`` goes to (ValueError without candidates)."""
    if not candidates:
        raise ValueError(f"no candidate to assign {key!r} to")
    return max(candidates, key=lambda c: weight(c, key))


def assign(streams: Mapping[str, str | None], candidates: Mapping[str, str]) -> dict[str, str]:
    """Each stream's candidate: ``streams`` maps a stream id to the node it is pinned to (None:
    any), ``candidates`` a candidate id to the node it runs on. A stream pinned to a node without
    a candidate raises `ConfigError`."""
    by_node: dict[str, list[str]] = {}
    for cid, node in candidates.items():
        by_node.setdefault(node, []).append(cid)
    out: dict[str, str] = {}
    for sid, node in streams.items():
        pool = list(candidates) if node is None else by_node.get(node, [])
        if not pool:
            raise ConfigError(f"stream {sid!r} is pinned to node {node!r}, where no source actor runs")
        out[sid] = rendezvous(sid, pool)
    return out
