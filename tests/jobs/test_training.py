"""`jobs.train.train_job`: the smoke config's loss falls, resume continues, mismatches are refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from jobs.datasets import synthetic_stream
from jobs.finetune import build_model_config
from jobs.train import ChainDropout, PoolPhase, lane_plan, train_job
from paths import REPO
from perceiver_stream.batch import Batch, ModalityBatch
from perceiver_stream.checkpoint import load_checkpoint, read_config
from perceiver_stream.streaming import StreamingPerceiverIO
from perceiver_stream.train import PooledLabelObjective
from pipeline.collate import collate
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.sources.synthetic import CLASSES

CONFIGS = REPO / "configs"


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(CONFIGS / "train_smoke.yaml", [f"output.dir={tmp_path / 'out'}",
                                                       f"train.checkpoint={tmp_path / 'final'}", *overrides])


def test_smoke_config_trains_and_its_loss_falls(tmp_path):
    summary = train_job(_cfg(tmp_path), progress=False)
    assert summary["last_loss"]["loss"] < summary["first_loss"]["loss"]
    assert summary["last_loss"]["label_ce"] < summary["first_loss"]["label_ce"]
    model, meta = load_checkpoint(tmp_path / "final")
    assert meta["train_seeds"] == [0, 1, 2, 3] and meta["step"] == summary["steps"]
    assert list(model.config.labels.class_names) == list(CLASSES) == meta["class_names"]
    assert meta["data"]["video"]["size"] == [32, 32]
    evals = summary["eval"]["900"]
    assert set(evals) == {"all", "drop_video", "drop_audio", "drop_points"}
    assert evals["drop_video"]["flow_epe"] is None and evals["all"]["flow_epe"] > 0
    assert all(e["windows"] == 200 for e in evals.values())
    json.dumps(summary)  # printed as JSON by the CLI


def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    short = ["train.final_eval=false", "train.seconds=4", "train.seeds=[0, 1]", "train.checkpoint_every=3"]
    first = train_job(_cfg(tmp_path, *short, "train.steps=3"), progress=False)
    assert first["resumed_from"] == 0
    saved, meta = read_config(tmp_path / "out" / "_checkpoints" / "train" / "step-0000003")
    assert meta["step"] == 3
    second = train_job(_cfg(tmp_path, *short, "train.steps=5"), progress=False)
    assert second["resumed_from"] == 3 and second["steps"] == 5
    _, final_meta = load_checkpoint(tmp_path / "final")
    assert final_meta["step"] == 5
    kept = sorted(p.name for p in (tmp_path / "out" / "_checkpoints" / "train").iterdir())
    assert kept == ["step-0000003", "step-0000005"]
    fresh = train_job(_cfg(tmp_path, *short, "train.steps=3"), resume=False, progress=False)
    assert fresh["resumed_from"] == 0
    # the fresh run's checkpoints replaced the longer earlier run's (none of step 5 left to resume)
    kept = sorted(p.name for p in (tmp_path / "out" / "_checkpoints" / "train").iterdir())
    assert kept == ["step-0000003"]


def test_resume_refuses_a_checkpoint_of_another_model_data_or_optimisation(tmp_path):
    short = ["train.final_eval=false", "train.seconds=4", "train.seeds=[0, 1]", "train.steps=2"]
    train_job(_cfg(tmp_path, *short), progress=False)
    with pytest.raises(ConfigError, match="num_latents"):
        train_job(_cfg(tmp_path, *short, "train.steps=4", "train.model.encoder.num_latents=8"), progress=False)
    with pytest.raises(ConfigError, match="train_seeds"):
        train_job(_cfg(tmp_path, *short, "train.steps=4", "train.seeds=[0, 5]"), progress=False)
    with pytest.raises(ConfigError, match=r"train\.lr.*train\.label_start"):
        train_job(_cfg(tmp_path, *short, "train.steps=4", "train.lr=0.5", "train.label_start=1"), progress=False)


def test_held_out_streams_must_not_be_training_seeds(tmp_path):
    with pytest.raises(ConfigError, match=r"\[900\]"):
        train_job(_cfg(tmp_path, "train.seeds=[0, 900]"), progress=False)


def test_lanes_walk_short_chains_of_distinct_streams_and_reach_every_window():
    lengths = [5, 3, 6, 4, 7]
    plan = lane_plan(lengths, batch_size=3, seed=0, chain=3)
    batches = [next(plan) for _ in range(400)]
    assert all(len(b) == 3 and len({s for s, _ in b}) == 3 for b in batches)  # full, no stream twice
    assert {p for b in batches for p in b} == {(s, t) for s, n in enumerate(lengths) for t in range(n)}
    for lane in range(3):
        walk = [b[lane] for b in batches]
        run = 1
        for (s0, t0), (s1, t1) in zip(walk, walk[1:]):
            if (s1, t1) == (s0, t0 + 1):
                run += 1
                assert run <= 3  # a chain is at most `chain` windows
            else:
                assert s1 != s0  # a new chain is on another stream
                run = 1
    # Staggered: the lanes' first chains end on different steps (streams too long to cut them).
    long = lane_plan([1000] * 5, batch_size=3, seed=0, chain=3)
    first = [next(long) for _ in range(4)]
    ends = [next(i for i in range(1, 4) if first[i][lane][0] != first[0][lane][0]) for lane in range(3)]
    assert sorted(ends) == [1, 2, 3]
    again = lane_plan(lengths, batch_size=3, seed=0, chain=3)
    assert [next(again) for _ in range(400)] == batches  # resumable: a function of the seed and step

def test_modality_dropout_is_drawn_once_per_chain():
    """A lane keeps its dropped modalities while it walks one stream, and draws anew on a new chain
    (drawn per window, the carried state leaked a dropped modality from the window before)."""
    def batch(n: int) -> Batch:
        one = ModalityBatch(torch.zeros(n, 1), torch.zeros(n, 1, dtype=torch.float64), torch.ones(n, 1, dtype=torch.bool),
                            torch.ones(n, dtype=torch.bool))
        z = torch.zeros(n, dtype=torch.float64)
        return Batch([f"s{i}" for i in range(n)], torch.arange(n), z, z + 1, torch.zeros(n, dtype=torch.bool),
                     {"video": one, "audio": one, "points": one})

    plan = lane_plan([50] * 12, batch_size=8, seed=0, chain=4)
    dropout = ChainDropout(0.4, torch.Generator().manual_seed(0))
    steps = []
    for _ in range(200):
        places = next(plan)
        out = dropout(batch(8), places)
        steps.append((places, torch.stack([m.present for m in out.modalities.values()], dim=1)))
    changed = same = 0
    for (p0, kept0), (p1, kept1) in zip(steps, steps[1:]):
        for lane in range(8):
            assert kept1[lane].any()
            if p1[lane] == (p0[lane][0], p0[lane][1] + 1):
                assert torch.equal(kept1[lane], kept0[lane])  # the same chain: the same modalities
                same += 1
            else:
                changed += int(not torch.equal(kept1[lane], kept0[lane]))
    assert same > 800 and changed > 100  # new chains do draw anew
    dropped = torch.stack([k for _, k in steps]).float().mean(dim=(0, 1))
    assert torch.all((dropped > 0.45) & (dropped < 0.8))  # about 1 - 0.4, a little more for the kept one


def test_pool_phase_trains_the_pooled_read_alone_and_resumes_into_it(tmp_path):
    pooled = ["train.final_eval=false", "train.seconds=4", "train.seeds=[0, 1]", "train.checkpoint_every=3",
              "train.steps=3", "train.model.labels.pool=[video]",
              "train.model.modalities.video={kind: video, patch: 8, conv: 4}"]
    summary = train_job(_cfg(tmp_path, *pooled, "train.pool_steps=3"), progress=False)
    assert summary["steps"] == 6 and summary["last_loss"].keys() >= {"pool_ce"}
    folder = tmp_path / "out" / "_checkpoints" / "train"
    main, _ = load_checkpoint(folder / "step-0000003")
    final, meta = load_checkpoint(tmp_path / "final")
    assert meta["step"] == 6
    pool = {n for n, p in final.named_parameters() if any(p is q for q in final.pool_parameters())}
    assert "labels.pool_gates" in pool
    assert all(".stem." in n or n.startswith(("labels.pools.", "labels.pool_gates")) for n in pool)
    before, after = main.state_dict(), final.state_dict()
    # the main phase leaves the pooled read shut; the pool phase trains it and nothing else
    assert torch.all(before["labels.pool_gates"] == 0) and torch.all(after["labels.pool_gates"] != 0)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in pool)
    assert not torch.equal(before["labels.pools.video.1.weight"], after["labels.pools.video.1.weight"])
    longer = train_job(_cfg(tmp_path, *pooled, "train.pool_steps=5"), progress=False)
    assert longer["resumed_from"] == 6 and load_checkpoint(tmp_path / "final")[1]["step"] == 8
    with pytest.raises(ConfigError, match="pool phase has begun"):
        train_job(_cfg(tmp_path, *pooled[:4], "train.steps=4", *pooled[5:], "train.pool_steps=5"), progress=False)
    with pytest.raises(ConfigError, match="labels.pool"):
        train_job(_cfg(tmp_path, *pooled[:4], "train.pool_steps=2"), resume=False, progress=False)


@torch.no_grad()
def test_pool_phase_reads_are_the_model_s_own_without_each_other_modality(tmp_path):
    cfg = _cfg(tmp_path, "train.model.labels.pool=[video]",
               "train.model.modalities.video={kind: video, patch: 8, conv: 4}")
    torch.manual_seed(0)
    model = StreamingPerceiverIO(build_model_config(cfg)).eval()
    model.labels.pool_gates.fill_(1.0)
    windows = synthetic_stream(cfg, 0, 3.0, video_frames=2)
    pool = PoolPhase(model, windows, 2, progress=False, chunk=2)
    assert pool.others == ["audio", "points"] and pool.reads.shape == (len(windows), 2, 32)
    assert torch.equal(pool.labels, collate(windows).targets.label)
    batch = collate(windows, video_frames=2)
    for i, name in enumerate(pool.others):
        lacking = replace(batch, modalities={k: m for k, m in batch.modalities.items() if k != name})
        expect = model(lacking).label_logits
        torch.testing.assert_close(model.labels.head(pool.reads[:, i] + model.pooled_label_read(batch)), expect)
    item = next(pool.batches(8, torch.Generator().manual_seed(0)))
    assert set(item.batch.modalities) == {"video"} and item.reads.shape == (8, 32) and item.labels.shape == (8,)
    loss, parts = PooledLabelObjective(model)(0, item)
    assert loss.ndim == 0 and torch.isfinite(loss) and parts == {"pool_ce": loss}
