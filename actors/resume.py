"""What the driver gives up when a source pool dies between two of a stream's replies.

A pool runs a stream's ``next`` calls in ``seq`` order, but goes on to call k+1 once call k has
returned, before Ray has sent k's reply: a pool killed in between leaves the driver window k+1
without window k. The model runs a stream's windows in ``seq`` order, so window k+1 would wait for
k forever; and the restarted source must decode window k again. So the windows delivered after a
lost call are given up (`actors.streams.StreamStatus.give_up`) and decoded again by the restarted
source, which resumes at the stream's lowest window the run does not own, with a new state chain.

A window can also be lost after its source delivered it: a window larger than Ray inlines lives in
the object store of the node that decoded it, and a model call whose window left with that node
fails. `rewind` then sends each of the call's streams back to that window, as if the call that
decoded it had been lost: the windows after it leave the run, and its source decodes them again.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import ray

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


def rewind(
    streams: MutableMapping[str, StreamStatus], lost: list[Call], held: list[Call],
    late_ends: list[tuple[Call, Any]], model_calls: Iterable[list[Call]], source_calls: dict[ray.ObjectRef, Call],
) -> tuple[dict[str, int], list[Call], list[tuple[Call, Any]]]:
    """Send each stream of the ``lost`` windows (delivered, then lost with their data; calls no
    longer in ``model_calls``) back to its lowest lost window (`StreamStatus.rewind`): its later
    calls leave ``held``, ``late_ends`` and ``source_calls`` (answers not yet read are ignored) and
    are marked ``dropped`` where the model has them. Returns the window each stream goes back to,
    and the new ``held`` and ``late_ends``."""
    first: dict[str, tuple[int, int]] = {}  # stream -> (seq, window id) of its lowest lost window
    for call in lost:
        if call.window_id is not None and call.seq < first.get(call.stream_id, (call.seq + 1, 0))[0]:
            first[call.stream_id] = (call.seq, call.window_id)

    def gone(call: Call) -> bool:
        return call.stream_id in first and call.seq >= first[call.stream_id][0]

    given_up = {sid: 0 for sid in first}
    for call in [*lost, *held]:
        if gone(call) and call.window_id is not None:
            given_up[call.stream_id] += 1
    for calls in model_calls:
        for call in calls:
            if gone(call) and not call.dropped:
                call.dropped = True
                given_up[call.stream_id] += 1
    for ref in [ref for ref, call in source_calls.items() if gone(call)]:
        del source_calls[ref]
    for sid, (seq, window_id) in first.items():
        streams[sid].rewind(seq, window_id, given_up[sid])
    return ({sid: window_id for sid, (_, window_id) in first.items()},
            [c for c in held if not gone(c)], [(c, ev) for c, ev in late_ends if not gone(c)])
