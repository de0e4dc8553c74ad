"""The driver's side of windows lost with a node after their source delivered them (`rewind`)."""

from __future__ import annotations

from actors.batching import Call
from actors.resume import rewind
from actors.streams import StreamStatus


def _delivered(st: StreamStatus, n: int, first_window: int = 0) -> list[Call]:
    calls = []
    for _ in range(n):
        seq = st.requested()
        st.decoded(seq, first_window + seq)
        calls.append(Call(st.stream_id, seq, window=f"{st.stream_id}{seq}", window_id=first_window + seq))
    return calls


def test_rewind_sends_each_stream_back_to_its_lowest_lost_window_and_drops_what_follows():
    a, b, c = StreamStatus("a"), StreamStatus("b", start_window=40), StreamStatus("c")
    streams = {"a": a, "b": b, "c": c}
    ca, cb, cc = _delivered(a, 5), _delivered(b, 3, 40), _delivered(c, 2)
    # The lost call held a's windows 2 and 3 and b's 41; a's 4 is in another call at the model,
    # b's 42 is held at the driver, c is untouched; a's call 5 and b's call 3 have not answered.
    lost = [ca[2], ca[3], cb[1]]
    other_model_call = [ca[4], cc[0]]
    held = [cb[2], cc[1]]
    source_calls = {"ra5": Call("a", a.requested(), "a5"), "rb3": Call("b", b.requested(), "b3"),
                    "rc2": Call("c", c.requested(), "c2")}
    late_ends = [(Call("b", 9, None), "end")]
    back, held, late_ends = rewind(streams, lost, held, late_ends, [other_model_call], source_calls)
    assert back == {"a": 2, "b": 41}
    assert held == [cc[1]] and late_ends == []
    assert [call.dropped for call in other_model_call] == [True, False]
    assert sorted(source_calls) == ["rc2"]
    # a keeps windows 0 and 1 in flight (sent earlier), 2..4 leave; b keeps 40.
    assert (a.next_window, a.delivered, a.in_flight) == (2, 2, 2)
    assert (b.next_window, b.delivered, b.in_flight) == (41, 1, 1)
    assert (c.next_window, c.delivered, c.in_flight) == (2, 2, 3)
    assert a.starts_chain(a.next_seq) and b.starts_chain(b.next_seq) and not c.starts_chain(c.next_seq)


def test_a_lost_end_of_stream_sends_nothing_back():
    st = StreamStatus("a")
    back, held, _ = rewind({"a": st}, [Call("a", st.requested(), None)], [], [], [], {})
    assert back == {} and held == [] and st.next_window == 0
