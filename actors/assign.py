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
from typing import Any

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


def resolve_node(stream_id: str, spec: str, nodes: list[Mapping[str, Any]]) -> str:
    """The id of the live node that ``spec`` (a node id, a node IP, or a custom resource held by one
    node) names, for ``stream_id``'s ``node``; ``nodes`` as `ray.nodes()` lists them. `ConfigError`
    naming the stream and the live nodes when none or several match."""
    alive = [n for n in nodes if n.get("Alive", True)]
    for key in ("NodeID", "NodeManagerAddress"):
        found = sorted({n["NodeID"] for n in alive if n.get(key) == spec})
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ConfigError(f"stream {stream_id!r}: node {spec!r} is the address of {len(found)} nodes; "
                              "pin it by node id")
    holders = sorted(n["NodeID"] for n in alive if spec in n.get("Resources", {}))
    if len(holders) == 1:
        return holders[0]
    known = ", ".join(f"{n['NodeID'][:12]}... at {n.get('NodeManagerAddress', '?')}" for n in alive)
    if holders:
        raise ConfigError(f"stream {stream_id!r}: node {spec!r} is a resource of {len(holders)} nodes; "
                          "pin it by node id or IP")
    raise ConfigError(f"stream {stream_id!r}: node {spec!r} is no live node's id, IP or resource "
                      f"(live nodes: {known})")


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
