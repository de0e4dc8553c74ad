"""What the driver gives up when a source pool dies between two of a stream's replies.

A pool runs a stream's ``next`` calls in ``seq`` order, but goes on to call k+1 once call k has
returned, before Ray has sent k's reply: a pool killed in between leaves the driver window k+1
without window k. The model runs a stream's windows in ``seq`` order, so window k+1 would wait for
k forever; and the restarted source must decode window k again. So the windows delivered after a
lost call are given up (`actors.streams.StreamStatus.give_up`) and decoded again by the restarted
source, which resumes at the stream's lowest window the run does not own, with a new state chain.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from actors.batching import Call
from actors.streams import StreamStatus


def drop_given_up(
    streams: Iterable[StreamStatus], held: list[Call], late_ends: list[tuple[Call, Any]],
    model_calls: Iterable[list[Call]],
) -> tuple[list[Call], list[tuple[Call, Any]]]:
    """Drop the windows ``streams`` give up: out of ``held``; marked ``dropped`` where already sent
    to the model (it fails them once the stream's new chain starts or the stream closes, and the
    driver ignores that); their ends of stream waiting in ``late_ends`` (answers after the lost call)
    released. Returns the new ``held`` and ``late_ends``."""
    gone: set[tuple[str, int]] = set()
    for st in streams:
        gone.update((st.stream_id, seq) for seq in st.give_up())
        for call, _ in late_ends:
            if call.stream_id == st.stream_id and st.after_loss(call.seq):
                st.released(call.seq)
                gone.add((call.stream_id, call.seq))
    for calls in model_calls:
        for call in calls:
            call.dropped = call.dropped or (call.stream_id, call.seq) in gone
    return ([c for c in held if (c.stream_id, c.seq) not in gone],
            [(c, ev) for c, ev in late_ends if (c.stream_id, c.seq) not in gone])
