"""ModelActor: batches windows of many streams through one streaming Perceiver IO.

An asyncio actor: each ``infer`` call parks one window and awaits its result, while a batching
task forms batches of up to ``model.batch_size`` windows, waiting at most ``model.max_wait_ms``
after the first ready window (less when every open stream is already in the batch), and runs the
model in a worker thread so windows keep arriving while it computes.

Latent state is carried per stream, so a stream's windows run in order and one at a time. This
actor alone keeps that order: the windows may arrive in any order, over several calls; each comes
with its place in its source's order (``seq``, numbered by the runner) and whether it starts a state
chain (a stream's first window in the run, or its first one resent after this actor was restarted);
a window runs once its predecessor in the chain has. A window still waiting when a newer chain of
its stream starts, or its stream closes, fails at once: the runner gave it up (its predecessor was
lost with a source pool, `actors.resume`). The state is reset on a chain start, a gap, or always
when ``model.state`` is false, and the result says so (``state_reset``).

With a DistillActor (``distill.enabled``), every ``distill.every_windows``-th batch is offered
to it with the teacher's outputs, without waiting: at most ``actors.distill.MAX_PENDING`` offers
are pending, further ones are dropped and counted (see `actors.distill`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import ray
import torch

from actors.distill import MAX_PENDING, teacher_outputs
from actors.memory import HeapTrimmer
from actors.metrics import Metrics
from actors.predictor import ShippedModel, load_predictor
from actors.results import WindowResult
from perceiver_stream.batch import Batch
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.streaming import StreamStates
from pipeline.collate import collate as pipeline_collate
from pipeline.config import Config
from pipeline.parquet import WindowRow
from pipeline.window import Window

TOP_K = 5


class Predictor(Protocol):
    """What the actor runs: a streaming model with its class names, on one device."""

    name: str
    class_names: list[str]
    device: torch.device
    video_frames: int | None  # trailing frames per window the model reads (None = all)
    stateful: bool  # False: windows are independent, no latent state is carried

    def __call__(self, batch: Batch, state: torch.Tensor | None) -> ModelOutput: ...


BuildPredictor = Callable[[Config, torch.device], Predictor]
Collate = Callable[..., Batch]  # pipeline.collate's signature


@dataclass
class _Item:
    seq: int
    window: Window
    arrived: float
    future: asyncio.Future = field(repr=False)
    chain_start: bool = False


def _signature(w: Window) -> dict[str, tuple]:
    """What must match for windows to share a batch, per modality present."""
    sig: dict[str, tuple] = {}
    if w.has_video:
        sig["video"] = tuple(w.video.shape[1:])
    if w.has_audio:
        sig["audio"] = (w.audio_rate, w.audio.shape[1])
    if w.has_points:
        sig["points"] = (w.points[0].shape[1],)
    return sig


class ModelActor:
    """Runs the model over windows from many streams (see the module docstring).

    ``device`` is ``"cuda"`` or ``"cpu"`` (the runner resolves ``model.device: auto``);
    ``num_cpus`` sets torch's thread count, since Ray starts workers with one OpenMP thread.
    ``model`` is the checkpoint the driver read (`actors.predictor.ship_model`; None: the actor
    reads the config's). ``build`` and ``collate`` default to the project's model loader and
    `pipeline.collate`. ``distill`` is the DistillActor handle when the run distils a student.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        device: str = "cpu",
        num_cpus: float = 1,
        build: BuildPredictor | None = None,
        collate: Collate | None = None,
        distill: Any | None = None,
        model: ShippedModel | None = None,
    ) -> None:
        torch.set_num_threads(max(1, int(num_cpus)))
        self._cfg = cfg
        self._device = torch.device(device)
        self._predictor = build(cfg, self._device) if build is not None else load_predictor(cfg, self._device, model)
        self._collate = collate or pipeline_collate
        self._autocast = self._device.type == "cuda"
        self._batch_size = cfg.model.batch_size
        self._max_wait_s = cfg.model.max_wait_ms / 1000.0
        self._carry = cfg.model.state and self._predictor.stateful
        self._pending: dict[str, dict[int, _Item]] = {}
        self._expected: dict[str, int] = {}
        self._states = StreamStates()
        self._open: set[str] = set()
        self._broken: set[str] = set()  # streams whose chain a failed batch cut
        self._wake: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        # One thread: batches run one after another, on the thread that set torch's thread count.
        self._executor = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(max(1, int(num_cpus)),))
        self._metrics = Metrics()
        self._trim = HeapTrimmer()
        self._windows_done = 0
        self._distill = distill
        self._distill_every = cfg.distill.every_windows
        self._distill_pending: list[ray.ObjectRef] = []
        self._batches = 0
        self._distill_dropped = 0

    # -- control ---------------------------------------------------------------------------
    def info(self) -> dict:
        """The model's name, class names and device, windows processed by this incarnation and
        windows not offered to the student while it was busy."""
        return {
            "model": self._predictor.name,
            "class_names": list(self._predictor.class_names),
            "device": str(self._device),
            "windows": self._windows_done,
            "distill_dropped": self._distill_dropped,
            "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "threads": torch.get_num_threads(),
        }

    async def distill_flush(self) -> int:
        """Wait until the DistillActor has taken every batch offered; returns the windows dropped."""
        pending, self._distill_pending = self._distill_pending, []
        for ref in pending:
            try:
                await ref
            except ray.exceptions.RayError:
                pass  # the distill actor reports its own failure when the runner finishes it
        return self._distill_dropped

    def set_open_streams(self, stream_ids: list[str]) -> None:
        """The streams that may still send windows: a batch holding all of them need not wait."""
        closed = self._open - set(stream_ids)
        self._open = set(stream_ids)
        for sid in closed:
            self._states.forget(sid)
            # The runner awaits nothing more of a closed stream: a window parked for it was given up.
            self._give_up(sid, list(self._pending.get(sid, {})), "its stream is closed")

    def _give_up(self, stream_id: str, seqs: list[int], why: str) -> None:
        """Fail the parked windows ``seqs`` of ``stream_id`` (their predecessor will never come)."""
        queued = self._pending.get(stream_id, {})
        for seq in seqs:
            item = queued.pop(seq)
            if not item.future.done():
                item.future.set_exception(RuntimeError(f"stream {stream_id!r} window {item.window.window_id}: {why}"))

    def queue_depth(self) -> int:
        """Windows parked in this actor."""
        return sum(len(p) for p in self._pending.values())

    # -- data ------------------------------------------------------------------------------
    async def infer(self, seq: int, chain_start: bool, window: Window | None) -> WindowResult | None:
        """Queue ``window`` (the ``seq``-th of its stream) and return its result once run; None
        (a source's end of stream, sent before the runner knew it) returns None."""
        if window is None:
            return None
        if self._wake is None:
            self._wake = asyncio.Event()
            self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())
        sid = window.stream_id
        if sid in self._broken and not chain_start:
            raise RuntimeError(
                f"stream {sid!r}: an earlier window failed in the model, so window {window.window_id} cannot follow it"
            )
        self._broken.discard(sid)
        item = _Item(seq, window, time.monotonic(), asyncio.get_running_loop().create_future(), chain_start)
        queued = self._pending.setdefault(sid, {})
        if seq in queued and not queued[seq].future.done():
            # The runner resent this window after a restart: the new call takes its place.
            queued[seq].future.set_exception(RuntimeError(f"stream {sid!r} window {window.window_id} was resent"))
        if not chain_start and seq < self._expected.get(sid, seq):
            raise RuntimeError(f"stream {sid!r} window {window.window_id} came after a newer state chain began")
        queued[seq] = item
        if chain_start:
            # Windows of an earlier chain still parked were given up by the runner (their source
            # lost a call before them, so their predecessor never comes): they must not wait.
            self._give_up(sid, [s for s in queued if s < seq], "a newer state chain began")
            self._expected[sid] = seq
            self._states.forget(sid)
        self._metrics.windows_in.inc(tags={"stage": "model", "stream": sid})
        self._metrics.queue_depth.set(self.queue_depth(), tags={"stage": "model"})
        self._wake.set()
        return await item.future

    async def infer_many(self, calls: list[tuple[int, bool]], *windows: Window) -> tuple:
        """`infer` for several windows in one Ray call: ``calls[i]`` is ``(seq, chain_start)`` of
        ``windows[i]``. Call with ``.options(num_returns=len(windows) + 1)``; returns ``(outcomes,
        *results)``: ``outcomes[i]`` is window i's id, or the exception its window raised (other
        windows are unaffected), and ``results[i]`` its `WindowResult` (None where it failed), so
        the runner reads only the small outcome list and hands the results to the sink by reference.

        Several windows per call instead of one: Ray's cost per actor call (about 2 ms of this
        actor's CPU) is paid once for all of them."""
        if len(calls) != len(windows):
            raise ValueError(f"infer_many: {len(calls)} (seq, chain_start) pairs for {len(windows)} windows")
        results = await asyncio.gather(
            *(self.infer(seq, chain, w) for (seq, chain), w in zip(calls, windows)), return_exceptions=True
        )
        outcomes = [r if isinstance(r, BaseException) else (None if r is None else r.window_id) for r in results]
        return (outcomes, *(None if isinstance(r, BaseException) else r for r in results))

    def _ready(self) -> list[_Item]:
        """Each stream's next window in its chain, oldest arrival first."""
        ready = []
        for sid, items in self._pending.items():
            exp = self._expected.get(sid)
            if exp is not None and exp in items:
                ready.append(items[exp])
        ready.sort(key=lambda it: it.arrived)
        return ready

    def _candidates(self) -> list[_Item]:
        """The next batch: the oldest ready window and the ready windows that can share its tensors
        (same frame size, audio layout and point width where both have the modality)."""
        batch: list[_Item] = []
        shape: dict[str, tuple] = {}
        for it in self._ready():
            sig = _signature(it.window)
            if any(shape.get(k, v) != v for k, v in sig.items()):
                continue
            shape.update(sig)
            batch.append(it)
            if len(batch) == self._batch_size:
                break
        return batch

    def _full(self, ready: list[_Item]) -> bool:
        if len(ready) >= self._batch_size:
            return True
        return bool(self._open) and self._open <= {it.window.stream_id for it in ready}

    async def _batch_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            ready = self._candidates()
            if not ready:
                continue
            deadline = ready[0].arrived + self._max_wait_s
            while not self._full(ready) and (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
                self._wake.clear()
                ready = self._candidates()
            batch = ready
            for it in batch:
                del self._pending[it.window.stream_id][it.seq]
            self._metrics.queue_depth.set(self.queue_depth(), tags={"stage": "model"})
            try:
                results = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as exc:  # noqa: BLE001 - the callers get the error, the actor goes on
                # A stream whose window failed cannot continue its state chain: fail its queued
                # windows too, so none waits for a predecessor that will never run.
                failed = {it.window.stream_id for it in batch}
                self._broken |= failed
                for sid in failed:
                    batch.extend(self._pending.pop(sid, {}).values())
                    self._expected.pop(sid, None)
                    self._states.forget(sid)
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
            else:
                for it, res in zip(batch, results):
                    self._expected[it.window.stream_id] = it.seq + 1
                    if not it.future.done():
                        it.future.set_result(res)
            self._wake.set()  # windows that arrived meanwhile may be ready now

    def _run(self, items: list[_Item]) -> list[WindowResult]:
        """Collate, run the model with each stream's carried state, and turn outputs into rows."""
        t0 = time.perf_counter()
        windows = [it.window for it in items]
        batch = self._collate(windows, video_frames=self._predictor.video_frames)
        batch.reset = torch.tensor(
            [it.chain_start or it.window.gap or not self._carry for it in items], dtype=torch.bool
        )
        # Also resets where the state held is not that of the window just before (a gap in ids).
        batch, state = self._states.gather(batch)
        resets = batch.reset.tolist()
        with torch.inference_mode(), torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=self._autocast):
            out = self._predictor(batch.to(self._device), state)
        if self._carry:
            self._states.update(batch, out.state)
        if self._distill is not None:
            self._offer(batch, out)
        results = self._rows(items, resets, out)
        elapsed = time.perf_counter() - t0
        self._windows_done += len(items)
        self._metrics.batch_size.observe(len(items))
        self._metrics.latency.observe(elapsed, tags={"stage": "model"})
        now = time.monotonic()
        for it, res in zip(items, results):
            res.latency_s = now - it.arrived
            self._metrics.windows_out.inc(tags={"stage": "model", "stream": it.window.stream_id})
        self._trim()
        return results

    def _offer(self, batch: Batch, out: ModelOutput) -> None:
        """Offer every ``every_windows``-th batch to the DistillActor, or drop it if it is busy."""
        self._batches += 1
        if self._batches % self._distill_every:
            return
        if self._distill_pending:
            n = len(self._distill_pending)
            self._distill_pending = ray.wait(self._distill_pending, num_returns=n, timeout=0)[1]
        if len(self._distill_pending) >= MAX_PENDING:
            self._distill_dropped += len(batch)
            self._metrics.distill_dropped.inc(len(batch))
            return
        # The collated CPU batch, without ground truth: the student learns from the teacher only.
        self._distill_pending.append(self._distill.step.remote(replace(batch, targets=None), teacher_outputs(out)))

    def _rows(self, items: list[_Item], resets: list[bool], out: ModelOutput) -> list[WindowResult]:
        names = self._predictor.class_names
        probs = torch.softmax(out.label_logits.float(), dim=-1).cpu()
        k = min(TOP_K, probs.shape[-1])
        top_p, top_i = probs.topk(k, dim=-1)
        emb = out.embedding.float().cpu().numpy()
        flow = None if out.flow is None else out.flow.float().cpu().numpy()
        flow_valid = out.flow_valid.cpu().numpy()
        rows = []
        for i, (it, reset) in enumerate(zip(items, resets)):
            w = it.window
            has_flow = flow is not None and bool(flow_valid[i])
            rows.append(
                WindowResult(
                    stream_id=w.stream_id,
                    row=WindowRow(
                        window_id=w.window_id,
                        t_start=w.t_start,
                        t_end=w.t_end,
                        has_video=w.has_video,
                        has_audio=w.has_audio,
                        has_points=w.has_points,
                        state_reset=reset,
                        labels=[(names[j], float(p)) for p, j in zip(top_p[i].tolist(), top_i[i].tolist())],
                        embedding=np.ascontiguousarray(emb[i], dtype=np.float32),
                        model=self._predictor.name,
                        t_wall=w.t_wall,
                    ),
                    flow=np.ascontiguousarray(flow[i], dtype=np.float32) if has_flow else None,
                    flow_t=float(w.video_t[-1]) if has_flow and w.video_t is not None else None,
                    frame=np.ascontiguousarray(w.video[-2]) if has_flow and w.video is not None else None,
                )
            )
        return rows
