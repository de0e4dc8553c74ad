"""The bench's model-only feed: streams are topped up in turn, as the pipeline driver does."""

from __future__ import annotations

from actors.bench import round_robin


def test_round_robin_shares_the_bound_between_streams():
    lengths = {"a": 100, "b": 100, "c": 100, "d": 100}
    zero = {s: 0 for s in lengths}
    order = round_robin(lengths, dict(zero), dict(zero), per_stream=16, room=32)
    assert order[:4] == ["a", "b", "c", "d"]
    assert {s: order.count(s) for s in lengths} == {"a": 8, "b": 8, "c": 8, "d": 8}


def test_round_robin_respects_each_stream_s_bound_and_end():
    lengths = {"a": 3, "b": 100, "c": 100}
    order = round_robin(lengths, {"a": 1, "b": 0, "c": 0}, {"a": 0, "b": 15, "c": 2}, per_stream=16, room=10)
    assert order.count("a") == 2  # windows 1 and 2 are left
    assert order.count("b") == 1  # one below its bound
    assert order.count("c") == 7 and len(order) == 10
    assert round_robin(lengths, {"a": 3, "b": 0, "c": 0}, {"a": 0, "b": 16, "c": 16}, per_stream=16, room=5) == []
    assert round_robin(lengths, {"a": 0, "b": 0, "c": 0}, {"a": 0, "b": 0, "c": 0}, per_stream=16, room=0) == []
