"""Reading a live container's packets on a thread: arrival times, lag, skipping to the live edge.

`PacketPump` demuxes one connection on its own thread into a buffer and stamps each packet with
its arrival (wall clock, ``time.time()``). Decoding (the consumer) can then fall behind what has
arrived while the connection keeps being read, and how far is measurable: the **lag** is the
media time of the newest packet that arrived minus that of the packet handed out next.

With ``max_lag_s`` set, `take` skips to the live edge when the lag exceeds it: it drops every
buffered packet before the newest video keyframe (the newest packet for an audio-only source),
where decoding can restart, and says how many media seconds it dropped. Without it the buffer
is bounded instead: the thread waits while ``_BUFFER_S`` of media (or ``_MAX_PACKETS``) are
buffered, so a slow consumer slows the connection, as a synchronous read would.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import av

# Without max_lag_s: media seconds buffered before the thread waits for the consumer.
_BUFFER_S = 10.0
# A cap on buffered packets either way (a source without timestamps, a long keyframe interval).
_MAX_PACKETS = 4096


@dataclass(frozen=True)
class Arrived:
    """One packet as it arrived: media time ``t`` (s, None without pts/dts), ``wall`` (epoch s)."""

    packet: av.Packet
    t: float | None
    wall: float
    key: bool


class _End:
    """The demuxer's end of data (StopIteration is not raised across threads)."""


class PacketPump:
    """Reads ``container``'s ``streams`` on a thread (see the module docstring).

    ``video_index`` is the index of the video stream whose keyframes are skip targets (None for
    an audio-only source). `take` returns packets in demux order and re-raises the demuxer's
    error (or StopIteration) once the buffer is drained. `close` stops the thread; the container
    is closed by whichever of the two finishes last, never while the thread is reading.
    """

    def __init__(
        self,
        container: av.container.InputContainer,
        streams: list[av.stream.Stream],
        *,
        video_index: int | None,
        max_lag_s: float | None,
    ) -> None:
        self._container = container
        self._streams = streams
        self._video_index = video_index
        self.max_lag_s = max_lag_s
        self._buf: deque[Arrived] = deque()
        self._cond = threading.Condition()
        self._end: BaseException | type[_End] | None = None
        self._stop = False
        self._done = False
        self._newest: Arrived | None = None  # the latest packet with a time
        self._newest_key: Arrived | None = None  # the latest skip target
        self._thread = threading.Thread(target=self._run, name="packet-pump", daemon=True)
        self._thread.start()

    # -- the reading thread -------------------------------------------------------------------

    def _full(self) -> bool:
        if len(self._buf) >= _MAX_PACKETS:
            return True
        return self.max_lag_s is None and self._buffered_s() > _BUFFER_S

    def _buffered_s(self) -> float:
        head = next((a for a in self._buf if a.t is not None), None)
        if head is None or self._newest is None:
            return 0.0
        return self._newest.t - head.t

    def _run(self) -> None:
        end: BaseException | type[_End] = _End
        try:
            for packet in self._container.demux(self._streams):
                wall = time.time()
                ts = packet.pts if packet.pts is not None else packet.dts
                t = float(ts * packet.time_base) if ts is not None and packet.time_base is not None else None
                video = packet.stream.index == self._video_index
                item = Arrived(packet, t, wall, bool(packet.is_keyframe) and (video or self._video_index is None))
                with self._cond:
                    while self._full() and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        break
                    self._buf.append(item)
                    if t is not None and (self._newest is None or t >= self._newest.t):
                        self._newest = item
                    if t is not None and (item.key or self._video_index is None):
                        self._newest_key = item
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which classifies it
            end = e
        with self._cond:
            self._done = True
            self._end = end
            self._cond.notify_all()
            close = self._stop
        if close:
            self._container.close()

    # -- the consumer -------------------------------------------------------------------------

    def lag_s(self) -> float:
        """Media seconds between the next packet to hand out and the newest that arrived."""
        with self._cond:
            return self._buffered_s()

    def take(self) -> tuple[Arrived, float]:
        """The next packet and the media seconds skipped just before it (0.0 when none)."""
        with self._cond:
            while not self._buf and self._end is None:
                self._cond.wait()
            if not self._buf:
                if self._end is _End:
                    raise StopIteration
                raise self._end
            skipped = self._skip()
            item = self._buf.popleft()
            self._cond.notify_all()
            return item, skipped

    def _skip(self) -> float:
        """Drop what lies before the newest skip target when lagging; the media seconds dropped."""
        if self.max_lag_s is None or self._newest_key is None:
            return 0.0
        head = next((a for a in self._buf if a.t is not None), None)
        if head is None or self._buffered_s() <= self.max_lag_s or self._newest_key.t <= head.t:
            return 0.0
        target = self._newest_key
        while self._buf and self._buf[0] is not target:
            self._buf.popleft()
        return target.t - head.t

    def close(self) -> None:
        """Stop reading; the container is closed now or when the thread's current read returns."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            done = self._done
        if done:
            self._container.close()


__all__ = ["Arrived", "PacketPump"]
