"""Students: smaller ``StreamingPerceiverIO``s distilled from a teacher, and the distillation loss.

A student is the same architecture with fewer latents, a shallower latent tower and a narrower
flow decoder. It keeps the teacher's latent width, so its embedding lives in the teacher's
space and ``cosine(student, teacher)`` is meaningful without a projection; ``init_from_teacher``
copies every teacher tensor the student can use as is (adapters, encoder, label decoder, the
first tower layers, an evenly strided subset of the latents), so distillation starts close.

The loss (``distill_losses``) matches the teacher's outputs, never ground truth:

- ``embedding``: ``1 - cosine`` between the window embeddings;
- ``labels``: ``KL(teacher || student)`` of the label scores softened at ``temperature``,
  times ``temperature**2`` (Hinton et al.'s scaling keeps gradients comparable across T);
- ``flow``: mean L1 (px) to the teacher's flow where both have flow.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from perceiver_stream.config import StreamingConfig, deep_merge
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.streaming import StreamingPerceiverIO


def student_config(teacher: StreamingConfig, overrides: dict[str, Any] | None = None) -> StreamingConfig:
    """The student's config: ``teacher`` with nested ``overrides`` deep-merged in (`config.deep_merge`:
    ``{"encoder": {"num_latents": 8}, "modalities": {"points": {"max_points": 128}}}``). Defaults:
    a quarter of the latents, one self-attention layer applied once, half the flow channels and no
    flow refiner (``flow.refine`` would cost the student more than the rest of its flow decoder). The
    modalities, the latent width, the flow grid and the classes stay the teacher's, so outputs are
    comparable: an override that changes them raises ValueError, as does an invalid one."""
    defaults: dict[str, Any] = {"encoder": {"num_latents": max(8, teacher.encoder.num_latents // 4),
                                            "self_attends_per_block": 1, "num_blocks": 1}}
    if teacher.flow is not None:
        defaults["flow"] = {"channels": max(16, teacher.flow.channels // 2), "refine": 0}
    config = teacher.merged(deep_merge(defaults, dict(overrides or {})))
    changed = []
    if config.encoder.latent_channels != teacher.encoder.latent_channels:
        changed.append("encoder.latent_channels")
    if config.labels.class_names != teacher.labels.class_names:
        changed.append("labels.class_names")
    if config.flow is not None and teacher.flow is not None and config.flow.size != teacher.flow.size:
        changed.append("flow.size")
    if set(config.modalities) != set(teacher.modalities):
        changed.append("modalities (names)")
    if changed:
        raise ValueError(f"student config: {changed} must equal the teacher's (outputs must be comparable)")
    return config


@torch.no_grad()
def init_from_teacher(student: StreamingPerceiverIO, teacher: StreamingPerceiverIO) -> list[str]:
    """Copy into ``student`` every teacher tensor of the same name and shape; the latents take an
    evenly strided subset of the teacher's, group by group (the shared latents from the shared
    ones, each modality's own from the teacher's own for that modality). Returns the names of the
    student tensors left as initialised (shapes that differ, e.g. a narrower flow decoder)."""
    theirs = teacher.state_dict()
    left = []
    for name, value in student.state_dict().items():
        src = theirs.get(name)
        if name == "encoder.latents" and src is not None and src.shape[1] == value.shape[1]:
            for group in student.latent_modality.unique().tolist():
                mine = (student.latent_modality == group).nonzero().squeeze(1)
                pool = (teacher.latent_modality == group).nonzero().squeeze(1)
                if len(pool):
                    idx = torch.linspace(0, len(pool) - 1, len(mine)).round().long()
                    value[mine] = src[pool[idx]]
        elif src is not None and src.shape == value.shape:
            value.copy_(src)
        else:
            left.append(name)
    return left


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of two ``B x D`` embeddings."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def distill_losses(
    student: ModelOutput,
    teacher: ModelOutput,
    *,
    temperature: float = 2.0,
) -> dict[str, torch.Tensor]:
    """``embedding``, ``labels`` and (where both have flow) ``flow`` losses of ``student`` against
    ``teacher`` (teacher tensors are treated as constants)."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be positive, got {temperature}")
    out = {"embedding": (1.0 - embedding_cosine(student.embedding, teacher.embedding.detach())).mean()}
    if student.label_logits.shape[1]:
        t = temperature
        target = F.log_softmax(teacher.label_logits.detach().float() / t, dim=-1)
        pred = F.log_softmax(student.label_logits / t, dim=-1)
        out["labels"] = F.kl_div(pred, target, log_target=True, reduction="batchmean") * t * t
    if student.flow is not None and teacher.flow is not None:
        both = student.flow_valid & teacher.flow_valid.to(student.flow_valid.device)
        if bool(both.any()):
            out["flow"] = (student.flow[both] - teacher.flow.detach()[both].to(student.flow.dtype)).abs().mean()
    return out
