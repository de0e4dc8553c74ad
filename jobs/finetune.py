"""The model a training run starts from, what it keeps fixed, and its flow loss.

* `class_names(cfg)`: the synthetic rig's classes when ``train.seeds`` renders rigs, then the
  label table's classes of ``train.data`` (sorted, those not already there), or the ``train.init``
  checkpoint's when neither labels anything.
* `initial_model(cfg, classes)`: a fresh model of ``train.model``, or with ``train.init`` the
  checkpoint's model (``train.model`` overrides deep-merged into its config): every weight of the
  checkpoint that the model has in the same shape is kept (encoder, flow decoder, label reads); a new
  label head (``labels.head``) when the class names differ, and any weight the overrides add (such
  as ``labels.flow_read`` of ``labels.from_flow``), start afresh.
* `frozen(model, names)`: the parameters that ``train.freeze``'s name prefixes select.
* `inherited_data(cfg)`: the seeds and files the ``train.init`` checkpoint (and its own ancestors)
  was trained on, which the new checkpoint records too, so `eval` refuses them.
* `flow_term(cfg, model)`: the ``train.flow_loss`` objective (None: EPE to the truth flow).
"""

from __future__ import annotations

from pathlib import Path

import torch

from jobs.evaluate import load_model
from jobs.files_dataset import class_names as table_classes
from perceiver_stream.config import StreamingConfig
from perceiver_stream.photometric import PhotometricFlowLoss, TeacherFlowLoss
from perceiver_stream.streaming import StreamingPerceiverIO
from perceiver_stream.train import FlowTerm
from pipeline.config import Config, DataConfig
from pipeline.errors import ConfigError
from pipeline.sources.synthetic import CLASSES

NEW_HEAD = "labels.head."


def class_names(cfg: Config) -> tuple[str, ...]:
    """The class names the trained model answers (see the module docstring)."""
    names = list(CLASSES) if cfg.train.seeds else []
    data = cfg.train.data
    if isinstance(data, DataConfig):
        names += [n for n in table_classes(data) if n not in names]
    if not names and cfg.train.init is not None:
        model, _ = load_model(cfg.train.init, "train.init checkpoint")
        names = list(model.config.labels.class_names)
    if not names:
        raise ConfigError("train: nothing labels the windows (no seeds, no train.data.labels, no train.init)")
    return tuple(names)


def build_model_config(cfg: Config, classes: tuple[str, ...] = CLASSES) -> StreamingConfig:
    """The model to train: ``train.model`` overrides, flow grid = ``video.size``, ``classes``."""
    overrides = dict(cfg.train.model)
    if isinstance(overrides.get("flow", {}), dict):
        overrides["flow"] = {"size": list(cfg.video.size or (64, 64)), **overrides.get("flow", {})}
    overrides["labels"] = {**overrides.get("labels", {}), "class_names": list(classes)}
    try:
        return StreamingConfig.from_dict(overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.model: {e}") from None


def initial_model(cfg: Config, classes: tuple[str, ...]) -> tuple[StreamingPerceiverIO, list[str]]:
    """The model to train and the names of its weights that start afresh (all without ``train.init``)."""
    torch.manual_seed(0)
    if cfg.train.init is None:
        model = StreamingPerceiverIO(build_model_config(cfg, classes))
        return model, [n for n, _ in model.named_parameters()]
    base, _ = load_model(cfg.train.init, "train.init checkpoint")
    size = tuple(cfg.video.size or (64, 64))
    if base.config.flow is not None and tuple(base.config.flow.size) != size:
        raise ConfigError(f"video.size {list(size)} differs from the train.init checkpoint's flow grid "
                          f"{list(base.config.flow.size)}; set video.size to it", source=cfg.train.init)
    if tuple(base.config.labels.class_names) == tuple(classes) and not cfg.train.model:
        return base, []
    overrides = dict(cfg.train.model)
    overrides["labels"] = {**overrides.get("labels", {}), "class_names": list(classes)}
    try:
        model = StreamingPerceiverIO(base.config.merged(overrides))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.model: {e}") from None
    new_head = tuple(base.config.labels.class_names) != tuple(classes)
    old, own = base.state_dict(), model.state_dict()
    kept = {k: v for k, v in old.items()
            if k in own and own[k].shape == v.shape and not (new_head and k.startswith(NEW_HEAD))}
    model.load_state_dict(kept, strict=False)
    return model, [n for n, _ in model.named_parameters() if n not in kept]


def frozen(model: StreamingPerceiverIO, names: list[str]) -> set[int]:
    """``id``s of the parameters whose dotted names start with one of ``names`` (a whole name
    part: ``flow`` selects ``flow.*``, not ``flow_gate``). ConfigError for a name that selects none."""
    params = dict(model.named_parameters())
    ids: set[int] = set()
    for prefix in names:
        hit = [p for n, p in params.items() if n == prefix or n.startswith(prefix + ".")]
        if not hit:
            tops = sorted({n.split(".")[0] for n in params})
            raise ConfigError(f"train.freeze: {prefix!r} names no parameters; parts are {tops} "
                              "(or deeper, e.g. preprocess.video)")
        ids.update(id(p) for p in hit)
    return ids


def inherited_data(cfg: Config) -> tuple[list[int], list[str]]:
    """The training seeds and file digests recorded in the ``train.init`` checkpoint (none without one)."""
    if cfg.train.init is None:
        return [], []
    _, meta = load_model(cfg.train.init, "train.init checkpoint")
    return list(meta.get("train_seeds", [])), list(meta.get("train_files", []))


def flow_term(cfg: Config, model: StreamingPerceiverIO) -> FlowTerm | None:
    """The ``train.flow_loss`` objective for ``model`` (None for ``truth``)."""
    if cfg.train.flow_loss == "photometric":
        return PhotometricFlowLoss(model, smooth_weight=cfg.train.smooth_weight)
    if cfg.train.flow_loss == "teacher":
        teacher, _ = load_model(Path(cfg.train.flow_teacher), "train.flow_teacher")
        for p in teacher.parameters():
            p.requires_grad_(False)
        return TeacherFlowLoss(teacher)
    return None
