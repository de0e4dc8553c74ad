"""Config schema: loading, overrides, path resolution, errors that name the key, the hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from paths import REPO
from pipeline.config import Config, config_hash, load_config, parse_config
from pipeline.errors import ConfigError

DEFAULT = REPO / "configs" / "default.yaml"


def write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_default_config_is_a_finite_synthetic_demo():
    cfg = load_config(DEFAULT)
    assert isinstance(cfg, Config)
    assert 3 <= len(cfg.streams) <= 4
    assert all(s.synthetic is not None and s.synthetic.seconds <= 30 for s in cfg.streams)
    assert len({s.synthetic.seed for s in cfg.streams}) == len(cfg.streams)
    assert cfg.video.size == (64, 64)
    assert (cfg.audio.rate, cfg.audio.channels) == (16000, 1)
    assert (cfg.window.seconds, cfg.window.hop) == (1.0, 0.5)
    assert Path(cfg.output.dir).is_absolute()


def test_overrides_parse_yaml_scalars_and_index_lists():
    cfg = load_config(
        DEFAULT,
        ["streams.0.synthetic.seed=3", "window.hop=0.25", "video.size=[32, 48]", "model.num_gpus=null",
         "runtime.realtime=true"],
    )
    assert cfg.streams[0].synthetic.seed == 3
    assert cfg.window.hop == 0.25
    assert cfg.video.size == (32, 48)
    assert cfg.model.num_gpus is None
    assert cfg.runtime.realtime is True


def test_override_can_append_a_stream(tmp_path):
    p = write(tmp_path, {"streams": [{"id": "a", "synthetic": {"seed": 1}}]})
    cfg = load_config(p, ["streams.1.id=b", "streams.1.synthetic.seed=2"])
    assert [s.id for s in cfg.streams] == ["a", "b"]
    assert cfg.streams[1].synthetic.seed == 2


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    p = write(
        sub,
        {
            "streams": [
                {"id": "cam0", "video": "clips/a.mp4", "audio": "same", "points": "scans/"},
                {"id": "live", "video": "rtsp://127.0.0.1:8554/x", "audio": "/abs/a.wav"},
            ],
            "model": {"checkpoint": "../ckpt/m.safetensors"},
            "output": {"dir": "out"},
        },
    )
    cfg = load_config(p)
    cam, live = cfg.streams
    assert cam.video == str((sub / "clips" / "a.mp4").resolve())
    assert cam.audio == "same"
    assert cam.points == str((sub / "scans").resolve())
    assert live.video == "rtsp://127.0.0.1:8554/x"
    assert live.audio == "/abs/a.wav"
    assert cfg.model.checkpoint == str((tmp_path / "ckpt" / "m.safetensors").resolve())
    assert cfg.output.dir == str((sub / "out").resolve())


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("window.hopp=1", ["window.hopp", "unknown key"]),
        ("window.hop=2", ["window", "hop"]),
        ("window.hop=0", ["window.hop", "greater than 0"]),
        ("streams.0.synthetic.seed=x", ["streams.0.synthetic.seed", "integer"]),
        ("streams.1.id=sim0", ["streams", "sim0", "twice"]),
        ("model.device=tpu", ["model.device", "tpu"]),
        ("streams.0.video=a.mp4", ["streams.0", "synthetic"]),
        ("video.size=[0, 3]", ["video.size", "positive"]),
        ("streams.0.id=_hidden", ["streams.0.id", "_hidden"]),
        ("streams.9.id=x", ["streams.9.id", "past the end"]),
        ("window.hop.x=1", ["window.hop", "not a section"]),
        ("window.hop", ["window.hop", "dotted.key=value"]),
    ],
)
def test_errors_name_the_key_and_the_problem(override, names):
    with pytest.raises(ConfigError) as ei:
        load_config(DEFAULT, [override])
    msg = str(ei.value)
    assert "\n" not in msg
    for n in names:
        assert n in msg


def test_stream_rules(tmp_path):
    with pytest.raises(ConfigError, match="needs at least one of"):
        parse_config({"streams": [{"id": "a"}]})
    with pytest.raises(ConfigError, match="audio: same needs a video"):
        parse_config({"streams": [{"id": "a", "audio": "same"}]})
    with pytest.raises(ConfigError, match="streams: .*at least 1"):
        parse_config({"streams": []})


def test_file_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("streams: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_config_hash_is_stable_and_sensitive(tmp_path):
    a = load_config(DEFAULT)
    b = load_config(DEFAULT)
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16
    assert config_hash(load_config(DEFAULT, ["streams.0.synthetic.seed=99"])) != config_hash(a)
    # where outputs go and how fast they flow do not change a row
    assert config_hash(load_config(DEFAULT, ["output.dir=elsewhere", "runtime.realtime=true"])) == config_hash(a)
    # key order in the file does not matter
    data = yaml.safe_load(DEFAULT.read_text())
    reordered = write(tmp_path, dict(reversed(list(data.items()))))
    assert config_hash(parse_config(yaml.safe_load(reordered.read_text()), base_dir=DEFAULT.parent)) == config_hash(a)


def test_scale_out_keys_have_defaults_and_are_validated():
    cfg = load_config(DEFAULT)
    assert (cfg.model.replicas, cfg.runtime.schedule_timeout_s, cfg.sources.node_wait_s) == (1, 60.0, 300.0)
    cfg = load_config(DEFAULT, ["model.replicas=auto", "runtime.schedule_timeout_s=5", "sources.node_wait_s=0"])
    assert (cfg.model.replicas, cfg.runtime.schedule_timeout_s, cfg.sources.node_wait_s) == ("auto", 5.0, 0.0)
    assert load_config(DEFAULT, ["model.replicas=4"]).model.replicas == 4
    for bad, key in (("model.replicas=0", "model.replicas"), ("model.replicas=many", "model.replicas"),
                     ("runtime.schedule_timeout_s=0", "runtime.schedule_timeout_s"),
                     ("sources.node_wait_s=-1", "sources.node_wait_s")):
        with pytest.raises(ConfigError, match=key):
            load_config(DEFAULT, [bad])
