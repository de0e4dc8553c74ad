"""A window on its way through the driver (`Call`), how many a stream may have in flight
(`fair_share`), and when the driver sends decoded windows to the model (`send_now`), shared by the
runner and the model-only benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import ray


@dataclass
class Call:
    """One window on its way from its source through the model."""

    stream_id: str
    seq: int
    window: ray.ObjectRef  # the Window (None at the end of the stream)
    result: ray.ObjectRef | None = None  # the model's WindowResult, once sent to the model
    window_id: int | None = None  # once its source has delivered it
    replica: str | None = None  # the replica it was sent to
    dropped: bool = False  # given up after its source lost an earlier call: the model's answer is ignored


def send_now(held: int, at_model: int, batch_size: int) -> bool:
    """Whether the driver sends its ``held`` decoded windows to the model now, in one call: once
    they fill a batch, or at once while the model has less than a batch of work (``at_model``
    windows sent and not yet returned), so it never waits on the driver and a quiet live stream
    pays no latency. Holding them otherwise makes calls of about a batch, which is what spreads
    Ray's cost per call."""
    return held > 0 and (held >= batch_size or at_model < batch_size)


def fair_share(per_stream: int, total: int, asking: int) -> int:
    """The ``next`` calls one of ``asking`` streams may have in flight: ``per_stream``, but no more
    than an equal share of the run's ``total`` (at least one). A paced source's call holds its slot
    until its window's media time, so without the share the streams asked first would take every
    slot of the run and the others would starve."""
    return max(1, min(per_stream, -(-total // max(asking, 1))))
