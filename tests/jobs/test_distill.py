"""Students and online distillation: config, loss, steps towards the teacher, checkpoints."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from jobs.datasets import default_data_settings
from jobs.distill import distill_job
from jobs.evaluate import evaluate
from paths import REPO
from perceiver_stream.checkpoint import load_checkpoint, save_checkpoint
from perceiver_stream.config import StreamingConfig
from perceiver_stream.distill import Distiller
from perceiver_stream.streaming import StreamingPerceiverIO
from perceiver_stream.student import distill_losses, embedding_cosine, init_from_teacher, student_config
from pipeline.collate import collate
from pipeline.config import DistillConfig, parse_config, student_checkpoint_path
from pipeline.errors import ConfigError
from pipeline.read import read_windows


@pytest.fixture(scope="module")
def teacher_config(rig_config) -> StreamingConfig:
    """The tiny model grown into a teacher that a default student is smaller than: twice the latents,
    two blocks of two self-attends, twice the flow channels."""
    return rig_config.merged({"encoder": {"num_latents": 16, "self_attends_per_block": 2, "num_blocks": 2},
                              "flow": {"channels": 32}})


@pytest.fixture
def teacher(teacher_config) -> StreamingPerceiverIO:
    torch.manual_seed(1)
    return StreamingPerceiverIO(teacher_config).eval()


@pytest.fixture(scope="module")
def batch(rig_config):
    data = default_data_settings(rig_config)
    windows = list(read_windows({"id": "d", "synthetic": {"seed": 3, "seconds": 4}}, video=data["video"],
                                audio=data["audio"]))
    return collate(windows[:6], video_frames=2)


def test_student_config_is_smaller_and_comparable(teacher_config):
    teacher = teacher_config
    s = student_config(teacher)
    assert s.encoder.num_latents < teacher.encoder.num_latents
    assert s.encoder.self_attends_per_block * s.encoder.num_blocks < 4 and s.flow.channels < teacher.flow.channels
    assert s.encoder.latent_channels == teacher.encoder.latent_channels and s.labels == teacher.labels
    assert student_config(teacher, {"encoder": {"num_latents": 5}}).encoder.num_latents == 5
    # a refining teacher's student has no refiner unless asked for one
    refining = teacher.merged({"flow": {"refine": 2}})
    assert student_config(refining).flow.refine == 0
    assert student_config(refining, {"flow": {"refine": 1}}).flow.refine == 1
    with pytest.raises(ValueError, match="latent_channels"):
        student_config(teacher, {"encoder": {"latent_channels": 16}})
    with pytest.raises(ValueError, match="no option"):
        student_config(teacher, {"latents": 4})
    with pytest.raises(ValueError, match="'num_latents' is now 'encoder.num_latents'"):
        student_config(teacher, {"num_latents": 4})
    # adapter options merge into the teacher's spec; the modalities themselves stay
    cheap = student_config(teacher, {"modalities": {"points": {"max_points": 16}}, "flow": {"stride": 2}})
    assert cheap.modalities["points"]["max_points"] == 16 and cheap.flow.stride == 2
    assert cheap.flow.size == teacher.flow.size
    assert cheap.modalities["video"] == teacher.modalities["video"]
    assert cheap.modalities["points"]["pos_bands"] == teacher.modalities["points"]["pos_bands"]
    with pytest.raises(ValueError, match="modalities"):
        student_config(teacher, {"modalities": {"lidar": {"kind": "points"}}})


def test_init_from_teacher_copies_what_fits(teacher, batch):
    student = StreamingPerceiverIO(student_config(teacher.config))
    left = init_from_teacher(student, teacher)
    assert left and all(name.startswith("flow.") for name in left)  # only the narrower flow decoder
    assert torch.equal(student.encoder.cross_attends[0].attn.q.weight, teacher.encoder.cross_attends[0].attn.q.weight)
    t, s = teacher.encoder.latents, student.encoder.latents
    assert torch.equal(s[0], t[0]) and torch.equal(s[-1], t[-1])


def test_init_from_teacher_takes_each_latent_group_from_the_same_group(teacher_config):
    torch.manual_seed(0)
    cfg = teacher_config.merged({"encoder": {"num_latents": 12, "modality_latents": {"points": 6, "audio": 3}}})
    teacher = StreamingPerceiverIO(cfg)
    student = StreamingPerceiverIO(student_config(
        cfg, {"encoder": {"num_latents": 4, "modality_latents": {"points": 2, "audio": 3}}}))
    init_from_teacher(student, teacher)
    t, s = teacher.encoder.latents, student.encoder.latents
    assert torch.equal(s[:4], t[[0, 4, 7, 11]])  # shared from shared, evenly strided
    assert torch.equal(s[4:7], t[12:15])  # audio's own: all three
    assert torch.equal(s[7:9], t[[15, 20]])  # points' own: the first and the last


def test_distill_losses_vanish_on_the_teachers_own_outputs(teacher, batch):
    with torch.no_grad():
        out = teacher(batch)
    losses = distill_losses(out, out, temperature=2.0)
    assert set(losses) == {"embedding", "labels", "flow"}
    assert all(float(v) == pytest.approx(0.0, abs=1e-5) for v in losses.values())
    with pytest.raises(ValueError, match="temperature"):
        distill_losses(out, out, temperature=0.0)


def test_distill_steps_raise_cosine_to_teacher(teacher, batch):
    with torch.no_grad():
        t_out = teacher(batch)
    distiller = Distiller(teacher, DistillConfig(lr=3e-3, student={"encoder": {"num_latents": 4}}))

    def cosine() -> float:
        with torch.no_grad():
            return float(embedding_cosine(distiller.student(batch).embedding, t_out.embedding).mean())

    before = cosine()
    steps = [distiller.step(batch, t_out) for _ in range(25)]
    after = cosine()
    assert after > before
    assert steps[-1].losses["loss"] < steps[0].losses["loss"]
    assert steps[0].embedding.shape == t_out.embedding.shape and steps[0].cosine.shape == (len(batch),)
    assert distiller.steps == 25 and distiller.windows == 25 * len(batch)


def test_distill_modality_dropout_holds_per_stream_and_resets_the_student_state(teacher, batch):
    rows = replace(batch, stream_ids=[f"s{i}" for i in range(len(batch))], reset=torch.zeros(len(batch), dtype=torch.bool))
    distiller = Distiller(teacher, DistillConfig(student={"encoder": {"num_latents": 4}}, modality_dropout=0.6,
                                                 dropout_windows=2))
    names = list(rows.modalities)

    def present(b):
        return torch.stack([b.modalities[k].present for k in names], dim=1)

    first, second, third = (distiller._dropout(rows) for _ in range(3))
    assert bool((~present(first)).any())  # something is dropped at p = 0.6
    assert bool(present(first).any(dim=1).all())  # never every modality of a row
    assert torch.equal(present(second), present(first))  # a stream keeps its draws for 2 windows
    assert bool(first.reset.all()) and not bool(second.reset.any())  # new draws start from a reset state
    assert bool(third.reset.all())
    assert torch.equal(present(rows), torch.ones_like(present(rows)))  # the caller's batch is untouched
    off = Distiller(teacher, DistillConfig(student={"encoder": {"num_latents": 4}}))
    assert off._dropout(rows) is rows
    with torch.no_grad():
        t_out = teacher(rows)
    step = distiller.step(rows, t_out)
    assert set(step.losses) >= {"embedding", "labels"} and step.cosine.shape == (len(rows),)


def test_student_checkpoint_round_trip(teacher, batch, tmp_path):
    with torch.no_grad():
        t_out = teacher(batch)
    distiller = Distiller(teacher, DistillConfig(), metadata={"distill_seeds": [3]})
    distiller.step(batch, t_out)
    path = distiller.save(student_checkpoint_path(tmp_path))
    assert path == tmp_path / "_checkpoints" / "student"
    model, meta = load_checkpoint(path)
    assert meta["role"] == "student" and meta["steps"] == 1 and meta["distill_seeds"] == [3]
    assert model.config == distiller.student.config
    with torch.no_grad():
        a, b = model(batch), distiller.student(batch)
    assert torch.allclose(a.embedding, b.embedding) and torch.allclose(a.flow, b.flow)
    again = Distiller(teacher, DistillConfig())
    again.resume(path)
    assert again.steps == 1
    with torch.no_grad():
        assert torch.allclose(again.student(batch).label_logits, b.label_logits)


def test_distill_job_reads_streams_in_lockstep_and_saves_the_student(teacher, tmp_path):
    checkpoint = save_checkpoint(tmp_path / "teacher", teacher, {"train_seeds": [0]})
    data = {
        "streams": [{"id": "a", "synthetic": {"seed": 11, "seconds": 3}},
                    {"id": "b", "synthetic": {"seed": 12, "seconds": 4}}],
        **default_data_settings(teacher.config),
        "model": {"checkpoint": str(checkpoint)},
        "distill": {"enabled": True, "checkpoint_every": 2},
        "output": {"dir": str(tmp_path / "out")},
    }
    summary = distill_job(parse_config(data), progress=False)
    assert summary["steps"] == 7  # the longer stream's windows; the shorter one ends after 5
    assert summary["windows"] == 5 + 7
    assert summary["student_params"] < summary["teacher_params"] and summary["speedup"] > 0
    _, meta = load_checkpoint(student_checkpoint_path(tmp_path / "out"))
    assert meta["distill_seeds"] == [11, 12] and meta["train_seeds"] == [0] and meta["steps"] == 7
    data["streams"][0]["synthetic"]["seed"] = 0
    with pytest.raises(ConfigError, match=r"seeds \[0\] trained the teacher"):
        distill_job(parse_config(data), progress=False)


@pytest.mark.slow
def test_shipped_student_tracks_the_teacher_on_an_unseen_seed():
    root = REPO / "checkpoints"
    out = evaluate(root / "default", 502, student=root / "student")
    assert out["cosine_to_teacher"] >= 0.9
    assert out["student"]["label_accuracy"] >= out["label_accuracy"] - 0.05
