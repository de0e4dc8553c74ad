"""The model actor without the whole pipeline: batching, state chains, failures, the distiller offer.
Most run the actor class in-process (asyncio); one runs it on Ray with a fake model."""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
import pytest
import ray
import torch
from ray import cloudpickle

from actor_inputs import make_cfg, window
from actors.distill import MAX_PENDING
from actors.model import ModelActor
from actors.predictor import TorchPredictor
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.streaming import StreamingPerceiverIO


class FakePredictor:
    """State = windows since the last reset (B x 1 x 1); embedding = (window id, that count)."""

    name = "fake"
    class_names = ["a", "b", "c"]
    device = torch.device("cpu")
    video_frames = 2
    stateful = True

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.fail_on = fail_on

    def __call__(self, batch, state):
        self.batches.append(list(zip(batch.stream_ids, batch.window_ids.tolist())))
        if self.fail_on is not None and self.fail_on in batch.window_ids.tolist():
            raise RuntimeError(f"boom on window {self.fail_on}")
        b = len(batch)
        prev = torch.zeros(b, 1, 1) if state is None else state.float()
        count = torch.where(batch.reset[:, None, None], torch.zeros_like(prev), prev) + 1
        video = batch.modalities.get("video")
        valid = torch.zeros(b, dtype=torch.bool) if video is None else video.mask.sum(1) >= 2
        return ModelOutput(
            embedding=torch.stack([batch.window_ids.float(), count[:, 0, 0]], dim=1),
            label_logits=torch.tensor([[0.0, 2.0, 1.0]]).repeat(b, 1),
            flow=torch.ones(b, 8, 8, 2) if video is not None else None,
            flow_valid=valid,
            state=count,
        )


def make_actor(cfg, predictor=None):
    predictor = predictor or FakePredictor()
    actor = ModelActor(cfg, build=lambda c, d: predictor)
    return actor, predictor


def gather(actor, calls):
    async def go():
        return await asyncio.gather(*(actor.infer(seq, chain, w) for seq, chain, w in calls), return_exceptions=True)

    return asyncio.run(go())


def test_windows_of_a_stream_run_in_chain_order_with_state_carried():
    actor, pred = make_actor(make_cfg(1, max_wait_ms=1))
    actor.set_open_streams(["s0"])
    # Arrive out of order: seq 2, 1, then the chain start.
    res = gather(actor, [(2, False, window("s0", 7)), (1, False, window("s0", 6)), (0, True, window("s0", 5))])
    assert [b for b in pred.batches] == [[("s0", 5)], [("s0", 6)], [("s0", 7)]]
    assert [r.window_id for r in res] == [7, 6, 5]
    assert [r.row.embedding[1] for r in sorted(res, key=lambda r: r.window_id)] == [1.0, 2.0, 3.0]
    assert [r.row.state_reset for r in sorted(res, key=lambda r: r.window_id)] == [True, False, False]


def test_the_model_actor_orders_windows_that_arrive_out_of_order_over_several_calls():
    # The runner sends windows as they are decoded, unsorted: the model actor alone orders them.
    actor, pred = make_actor(make_cfg(2, max_wait_ms=1))
    actor.set_open_streams(["s0", "s1"])

    async def go():
        late = asyncio.ensure_future(
            actor.infer_many([(2, False), (1, False), (1, False)], window("s0", 12), window("s0", 11), window("s1", 21))
        )
        await asyncio.sleep(0.05)  # the later windows wait for their chain's start
        assert pred.batches == []
        first = await actor.infer_many([(0, True), (0, True)], window("s1", 20), window("s0", 10))
        return first, await late

    (first_ids, *_), (late_ids, *late) = asyncio.run(go())
    assert first_ids == [20, 10] and late_ids == [12, 11, 21]
    assert [w for b in pred.batches for sid, w in b if sid == "s0"] == [10, 11, 12]
    assert [w for b in pred.batches for sid, w in b if sid == "s1"] == [20, 21]
    assert [r.row.embedding[1] for r in late] == [3.0, 2.0, 2.0]  # state carried in seq order


def test_a_chain_started_after_a_restart_runs_from_its_first_window_in_seq_order():
    # After a restart the runner resends from each stream's lowest window without a result (seq 4).
    actor, pred = make_actor(make_cfg(1, max_wait_ms=1))
    actor.set_open_streams(["s0"])
    res = gather(actor, [(6, False, window("s0", 6)), (5, False, window("s0", 5)), (4, True, window("s0", 4))])
    assert pred.batches == [[("s0", 4)], [("s0", 5)], [("s0", 6)]]
    assert [(r.window_id, r.row.state_reset, r.row.embedding[1]) for r in res] == [
        (6, False, 3.0), (5, False, 2.0), (4, True, 1.0)
    ]


def test_a_resent_window_supersedes_the_one_waiting_for_its_chain():
    actor, pred = make_actor(make_cfg(1, max_wait_ms=1))
    actor.set_open_streams(["s0"])

    async def go():
        stale = asyncio.ensure_future(actor.infer(1, False, window("s0", 1)))  # arrived at a fresh actor
        await asyncio.sleep(0.05)
        fresh = await asyncio.gather(actor.infer(0, True, window("s0", 0)), actor.infer(1, False, window("s0", 1)))
        return await asyncio.gather(stale, return_exceptions=True), fresh

    (stale,), fresh = asyncio.run(go())
    assert isinstance(stale, RuntimeError) and "resent" in str(stale)
    assert [r.window_id for r in fresh] == [0, 1] and pred.batches == [[("s0", 0)], [("s0", 1)]]


def test_windows_waiting_for_a_lost_window_give_way_to_a_newer_chain_or_a_closed_stream():
    # Seq 1 was lost with its source: 2 waits for it until the restarted source's chain starts at 4.
    actor, pred = make_actor(make_cfg(2, max_wait_ms=1))
    actor.set_open_streams(["s0", "s1"])

    async def go():
        ran = await actor.infer(0, True, window("s0", 0))
        parked = asyncio.ensure_future(actor.infer(2, False, window("s0", 2)))
        other = asyncio.ensure_future(actor.infer(1, False, window("s1", 1)))  # s1's chain has not started
        await asyncio.sleep(0.05)
        fresh = await actor.infer(4, True, window("s0", 1))
        late = await asyncio.gather(actor.infer(3, False, window("s0", 3)), return_exceptions=True)  # after it
        actor.set_open_streams(["s0"])  # s1 closed: nothing of it is awaited any more
        return ran, fresh, await asyncio.gather(parked, other, return_exceptions=True), late

    ran, fresh, (parked, other), (late,) = asyncio.run(go())
    assert (ran.window_id, fresh.window_id, fresh.row.state_reset) == (0, 1, True)
    assert isinstance(parked, RuntimeError) and "a newer state chain began" in str(parked)
    assert isinstance(late, RuntimeError) and "after a newer state chain began" in str(late)
    assert isinstance(other, RuntimeError) and "its stream is closed" in str(other)
    assert pred.batches == [[("s0", 0)], [("s0", 1)]]


def test_gap_and_state_off_reset_the_state():
    actor, _ = make_actor(make_cfg(1, max_wait_ms=1))
    actor.set_open_streams(["s0"])
    res = gather(actor, [(0, True, window("s0", 0)), (1, False, window("s0", 1)), (2, False, window("s0", 3, gap=True))])
    assert [(r.row.state_reset, r.row.embedding[1]) for r in res] == [(True, 1.0), (False, 2.0), (True, 1.0)]
    actor, _ = make_actor(make_cfg(1, max_wait_ms=1, state=False))
    actor.set_open_streams(["s0"])
    res = gather(actor, [(0, True, window("s0", 0)), (1, False, window("s0", 1))])
    assert [(r.row.state_reset, r.row.embedding[1]) for r in res] == [(True, 1.0), (True, 1.0)]


def test_batch_holds_one_window_per_stream_and_fires_when_every_open_stream_is_in():
    # max_wait is long: the batch must fire because all three open streams are in it, not by time.
    actor, pred = make_actor(make_cfg(3, batch_size=8, max_wait_ms=20_000))
    actor.set_open_streams(["s0", "s1", "s2"])
    calls = [(k, k == 0, window(f"s{i}", k)) for k in range(2) for i in range(3)]
    t0 = time.monotonic()
    res = gather(actor, calls)
    assert time.monotonic() - t0 < 5
    assert len(res) == 6
    assert [sorted(b) for b in pred.batches] == [
        [("s0", 0), ("s1", 0), ("s2", 0)],
        [("s0", 1), ("s1", 1), ("s2", 1)],
    ]


def test_batch_size_bounds_a_batch_and_max_wait_fires_a_partial_one():
    actor, pred = make_actor(make_cfg(5, batch_size=2, max_wait_ms=1))
    actor.set_open_streams([f"s{i}" for i in range(5)])
    gather(actor, [(0, True, window(f"s{i}", 0)) for i in range(5)])
    assert max(len(b) for b in pred.batches) == 2
    assert sorted(x for b in pred.batches for x in b) == [(f"s{i}", 0) for i in range(5)]
    # One stream of two open: a lone window waits max_wait, then runs alone.
    actor, pred = make_actor(make_cfg(2, batch_size=8, max_wait_ms=200))
    actor.set_open_streams(["s0", "s1"])
    t0 = time.monotonic()
    gather(actor, [(0, True, window("s0", 0))])
    assert time.monotonic() - t0 >= 0.15
    assert pred.batches == [[("s0", 0)]]


def test_windows_that_cannot_share_tensors_run_in_separate_batches():
    actor, pred = make_actor(make_cfg(3, batch_size=8, max_wait_ms=1))
    actor.set_open_streams(["s0", "s1", "s2"])
    small = window("s1", 0)
    small.video = np.zeros((2, 4, 4, 3), np.uint8)
    res = gather(actor, [(0, True, window("s0", 0)), (0, True, small), (0, True, window("s2", 0))])
    assert not any(isinstance(r, Exception) for r in res)
    assert sorted(sorted(b) for b in pred.batches) == [[("s0", 0), ("s2", 0)], [("s1", 0)]]


def test_results_carry_top_labels_flow_and_modalities():
    actor, _ = make_actor(make_cfg(1, max_wait_ms=1))
    actor.set_open_streams(["s0"])
    two, one = gather(actor, [(0, True, window("s0", 0)), (1, False, window("s0", 1, frames=1))])
    assert [name for name, _ in two.row.labels] == ["b", "c", "a"]
    scores = [s for _, s in two.row.labels]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-6
    assert two.flow is not None and two.flow.shape == (8, 8, 2) and two.flow.dtype == np.float32
    assert two.flow_t == pytest.approx(0.1)
    assert one.flow is None and one.flow_t is None
    assert (two.row.has_video, two.row.has_audio, two.row.has_points) == (True, False, False)
    assert two.row.model == "fake" and two.row.embedding.dtype == np.float32


def test_a_failing_window_fails_its_stream_queue_but_not_other_streams():
    actor, _ = make_actor(make_cfg(2, max_wait_ms=1), FakePredictor(fail_on=1))
    actor.set_open_streams(["s0", "s1"])
    res = gather(
        actor,
        [(0, True, window("s0", 0)), (1, False, window("s0", 1)), (2, False, window("s0", 2)), (0, True, window("s1", 5))],
    )
    assert not isinstance(res[0], Exception)
    assert isinstance(res[1], RuntimeError) and isinstance(res[2], RuntimeError)
    assert not isinstance(res[3], Exception) and res[3].window_id == 5
    # A window of the broken chain that arrives later fails at once instead of waiting forever.
    late = gather(actor, [(3, False, window("s0", 3))])
    assert isinstance(late[0], RuntimeError) and "earlier window failed" in str(late[0])


def test_infer_many_returns_each_windows_outcome_and_result_and_isolates_a_failure():
    actor, pred = make_actor(make_cfg(2, max_wait_ms=1), FakePredictor(fail_on=1))
    actor.set_open_streams(["s0", "s1"])
    calls = [(0, True), (1, False), (2, False), (0, True)]
    windows = [window("s0", 0), window("s0", 1), window("s0", 2), window("s1", 7)]
    outcomes, *results = asyncio.run(actor.infer_many(calls, *windows))
    assert pred.batches == [[("s0", 0), ("s1", 7)], [("s0", 1)]]
    assert len(results) == 4
    assert outcomes[0] == 0 and results[0].window_id == 0 and results[0].row.state_reset
    # s0's window 1 failed in the model, and so its successor: outcomes are the exceptions ...
    assert all(isinstance(o, RuntimeError) for o in outcomes[1:3]) and "boom on window 1" in str(outcomes[1])
    assert results[1] is None and results[2] is None
    # ... while s1's window, in the same call, has its result.
    assert outcomes[3] == 7 and results[3].window_id == 7
    with pytest.raises(ValueError, match="2 \\(seq, chain_start\\) pairs for 1 windows"):
        asyncio.run(actor.infer_many([(2, False), (3, False)], window("s1", 9)))


def test_model_actor_on_ray_with_a_fake_model(ray_session):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = make_cfg(2, batch_size=4, max_wait_ms=5)
    actor = ray.remote(ModelActor).options(num_cpus=0, max_concurrency=16).remote(cfg, build=_fake_build)
    try:
        assert ray.get(actor.info.remote())["class_names"] == ["a", "b", "c"]
        ray.get(actor.set_open_streams.remote(["s0", "s1"]))
        refs = [actor.infer.remote(k, k == 0, ray.put(window(sid, k))) for k in range(2) for sid in ("s0", "s1")]
        res = ray.get(refs)
        # The rest in one call, as the runner sends them: an outcome list, then one result each.
        calls = [(k, False) for sid in ("s0", "s1") for k in range(2, 4)]
        ack, *more = actor.infer_many.options(num_returns=5).remote(calls, *(window(sid, k) for sid in ("s0", "s1") for k in range(2, 4)))
        assert ray.get(ack) == [2, 3, 2, 3]
        res += ray.get(more)
        assert sorted((r.stream_id, r.window_id) for r in res) == [(s, k) for s in ("s0", "s1") for k in range(4)]
        assert all(r.row.embedding[1] == r.window_id + 1 for r in res)  # state carried through all four
    finally:
        ray.kill(actor)


def _fake_build(cfg, device):
    return FakePredictor()


def test_model_actor_offers_every_nth_batch_to_the_distiller_and_drops_while_it_is_busy(ray_session):
    @ray.remote
    class SlowDistiller:
        def __init__(self):
            self.seen = []

        def step(self, batch, teacher):
            self.seen.append((batch.window_ids.tolist(), batch.targets, teacher.embedding.dtype, teacher.state.numel()))
            time.sleep(1.0)  # far slower than the fake model: offers pile up
            return len(batch)

        def get(self):
            return self.seen

    distiller = SlowDistiller.remote()
    cfg = make_cfg(1, batch_size=1)
    cfg.distill.enabled, cfg.distill.every_windows = True, 2
    actor = ModelActor(cfg, build=lambda c, d: FakePredictor(), distill=distiller)
    actor.set_open_streams(["s0"])
    n = 12
    res = gather(actor, [(k, k == 0, window("s0", k)) for k in range(n)])
    assert [r.window_id for r in res] == list(range(n))  # the model never waited for the student
    dropped = asyncio.run(actor.distill_flush())
    seen = ray.get(distiller.get.remote())
    # Batches 2, 4, ... (window ids 1, 3, ...) are offered; the first MAX_PENDING are taken.
    assert [ids for ids, *_ in seen] == [[2 * k + 1] for k in range(MAX_PENDING)]
    assert dropped == n // 2 - MAX_PENDING == actor.info()["distill_dropped"]
    assert all(targets is None and dtype == torch.float32 and state == 0 for _, targets, dtype, state in seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_actor_runs_a_real_model_on_cuda_under_bf16_autocast(tiny_config):
    # a model of its own (moved to the GPU), its flow grid the size of the test windows' frames
    model = StreamingPerceiverIO(tiny_config.merged({"flow": {"size": (8, 8)}}))
    cfg = make_cfg(2, max_wait_ms=1, device="cuda")
    actor = ModelActor(cfg, device="cuda", build=lambda c, d: TorchPredictor(model, "tiny", d))
    actor.set_open_streams(["s0", "s1"])
    res = gather(actor, [(k, k == 0, window(f"s{i}", k)) for k in range(2) for i in range(2)])
    assert all(np.isfinite(r.row.embedding).all() and r.flow is not None and np.isfinite(r.flow).all() for r in res)
    assert next(model.parameters()).device.type == "cuda"
