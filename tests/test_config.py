"""The typed config: every shipped YAML loads, mistakes fail early naming the key, and a config
survives the trips it makes (to a dict, to YAML for `slm config`, to JSON inside checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slm.config import (
    Config,
    DepthConfig,
    ModelConfig,
    StreamConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)
from slm.errors import ConfigError, SlmError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*") if p.suffix in (".yaml", ".yml")
                 and "ablation" not in p.relative_to(REPO / "configs").parts)
ABLATIONS = sorted((REPO / "configs" / "ablation").glob("*.yaml"))


def config_id(path: Path) -> str:
    return str(path.relative_to(REPO / "configs"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# --- 1. every shipped config loads ---------------------------------------------------------

def test_there_are_configs_to_check():
    assert CONFIGS, "no YAML under configs/"
    assert REPO / "configs" / "tiny" / "synthetic.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert isinstance(config.model, ModelConfig)
    assert config.model.streams and all(isinstance(s, StreamConfig) for s in config.model.streams)


@pytest.mark.parametrize("path", ABLATIONS, ids=config_id)
def test_every_ablation_config_builds_each_strategy_config(path):
    from slm.ablate import load_ablation
    from slm.strategies import make_strategy
    from slm.vocab import Vocab

    vocab = Vocab.build(text_size=30, num_units=16, num_codebooks=2, codebook_size=8)
    ablation = load_ablation(path)
    for name, patch in ablation.strategies.items():
        config = load_config(ablation.base, [], [ablation.common, {"strategy": {"name": name}}, patch])
        assert make_strategy(config.strategy, vocab).name == name  # its options are its own


# --- 2. mistakes fail at load time, naming the key ------------------------------------------

def test_typo_in_yaml_names_the_key_path_and_file(tmp_path):
    path = write(tmp_path, "model:\n  d_modle: 64\n  num_layers: 2\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "'model.d_modle'" in message
    assert str(path) in message
    assert "d_model" in message, "lists the valid keys, so the fix is visible"


def test_typo_deep_in_a_list_of_streams_names_the_item(tmp_path):
    path = write(tmp_path, "model:\n  streams:\n    - {name: text, hed: depth}\n")
    with pytest.raises(ConfigError, match=r"'model\.streams\[0\]\.hed'"):
        load_config(path)


@pytest.mark.parametrize("text, key", [
    ("data:\n  batch_size: eight\n", "data.batch_size"),
    ("data:\n  batch_size: '8'\n", "data.batch_size"),
    ("optim:\n  learning_rate: fast\n", "optim.learning_rate"),
    ("train:\n  steps: true\n", "train.steps"),  # a bool is not an int
    ("model:\n  scan_layers: 1\n", "model.scan_layers"),  # nor an int a bool
    ("model: 3\n", "model"),
    ("model:\n  streams: {name: text}\n", "model.streams"),
    ("mesh:\n  ici: {data: 1, fsdp: all}\n", "mesh.ici.fsdp"),
])
def test_wrong_type_in_yaml_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text))
    assert f"{key}:" in str(raised.value), str(raised.value)


@pytest.mark.parametrize("override, named", [
    ("a.b=1", "'a'"),
    ("trian.steps=3", "'trian'"),
    ("train.stpes=3", "'train.stpes'"),
    ("model.depth.num_layer=1", "'model.depth.num_layer'"),
])
def test_unknown_override_names_the_key(override, named):
    with pytest.raises(ConfigError) as raised:
        load_config(None, [override])
    assert named in str(raised.value), str(raised.value)


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=eight", "data.batch_size"),
    ("train.steps=2.5", "train.steps"),
    ("vocab.extra_specials=<x>", "vocab.extra_specials"),
])
def test_wrong_type_in_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"{key}:"):
        load_config(None, [override])


def test_override_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps"])


@pytest.mark.parametrize("override", [
    "data.mixture={dialogue:",  # `data.mixture={dialogue: 1.0}` unquoted: the shell splits it
    "data.mixture={dialogue: 1.0",
    "mesh.ici=[1,",
])
def test_malformed_yaml_override_is_quoted_with_the_fix(override):
    with pytest.raises(ConfigError) as raised:
        load_config(None, [override])
    message = str(raised.value)
    assert repr(override) in message and "not valid YAML" in message
    assert "quote the whole override" in message and "'data.mixture={dialogue: 1.0" in message


def test_cli_reports_a_malformed_override_without_a_traceback(capsys):
    from slm.cli import main

    code = main(["config", "--config", str(REPO / "configs" / "tiny" / "spoken.yaml"),
                 "data.mixture={dialogue:"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("slm config: error: override 'data.mixture={dialogue:'"), err


def test_malformed_yaml_file_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\ndata:\n  mixture: {dialogue: 1.0\n  seq_len: 5\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: not valid YAML at line 5, column 10:"), message
    assert "starts on line 4" in message  # the unclosed `{`
    assert "<unicode string>" not in message and "\n" not in message


def test_config_errors_are_slm_errors(tmp_path):
    with pytest.raises(SlmError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(SlmError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(SlmError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


# --- 2. overrides: YAML values, numeric widening, nested dataclasses ----------------------------

def test_overrides_parse_yaml_values(tmp_path):
    config = load_config(REPO / "configs" / "tiny" / "synthetic.yaml", [
        "train.steps=7",
        "optim.learning_rate=0.0005",
        "optim.b2=0.99",
        "model.tie_embeddings=true",
        "model.scan_layers=false",
        "vocab.extra_specials=[<a>, <b>]",
        "mesh.ici={data: 2, fsdp: -1, tensor: 1}",
        "checkpoint.dir=",
        "data.source=synthetic",
    ])
    assert config.train.steps == 7 and type(config.train.steps) is int
    assert config.optim.learning_rate == 0.0005 and config.optim.b2 == 0.99
    assert config.model.tie_embeddings is True and config.model.scan_layers is False
    assert config.vocab.extra_specials == ["<a>", "<b>"]
    assert config.mesh.ici == {"data": 2, "fsdp": -1, "tensor": 1}
    assert config.checkpoint.dir == ""
    # Overrides change only what they name: the rest is the file's.
    assert config.vocab.text_size == 200 and config.data.seq_len == 32


def test_override_wins_over_the_file_and_later_override_wins(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n")
    assert load_config(path).train.steps == 5
    assert load_config(path, ["train.steps=9"]).train.steps == 9
    assert load_config(path, ["train.steps=9", "train.steps=11"]).train.steps == 11


def test_int_is_accepted_for_float_fields(tmp_path):
    config = load_config(write(tmp_path, "optim:\n  learning_rate: 1\n"), ["optim.clip_norm=2"])
    assert config.optim.learning_rate == 1.0 and type(config.optim.learning_rate) is float
    assert config.optim.clip_norm == 2.0 and type(config.optim.clip_norm) is float
    assert type(load_config(None, ["checkpoint.every_seconds=30"]).checkpoint.every_seconds) is float


def test_exponent_notation_is_a_float(tmp_path):
    """YAML 1.2 floats: PyYAML's 1.1 rules alone would read `1e-3` (no dot) as a string."""
    assert load_config(None, ["optim.learning_rate=1e-3"]).optim.learning_rate == 0.001
    config = load_config(write(tmp_path, "optim:\n  learning_rate: 3e-4\n  eps: 1E-8\n"))
    assert (config.optim.learning_rate, config.optim.eps) == (3e-4, 1e-8)
    # ...while integers stay integers (and an exponent is no integer).
    assert type(load_config(None, ["train.steps=10"]).train.steps) is int
    with pytest.raises(ConfigError, match="train.steps:"):
        load_config(None, ["train.steps=1e3"])


def test_nested_list_of_stream_dicts_builds_stream_configs():
    config = load_config(None, [
        "model.streams=[{name: text, ranges: [specials, text]},"
        " {name: ac0, ranges: [ac0], head: depth}]",
        "model.depth={num_layers: 1, cond_stream: text}",
    ])
    streams = config.model.streams
    assert streams == [StreamConfig("text", ["specials", "text"], "temporal"),
                       StreamConfig("ac0", ["ac0"], "depth")]
    assert all(type(s) is StreamConfig for s in streams)
    assert type(config.model.depth) is DepthConfig
    assert config.model.depth.num_layers == 1 and config.model.depth.d_model == DepthConfig().d_model


def test_multistream_yaml_streams_are_stream_configs():
    config = load_config(REPO / "configs" / "tiny" / "multistream.yaml")
    assert [(s.name, s.head) for s in config.model.streams] == [
        ("text", "temporal"), ("semantic", "temporal"),
        ("ac0", "depth"), ("ac1", "depth"), ("ac2", "depth")]
    assert all(type(s) is StreamConfig for s in config.model.streams)


# --- 3. round trips ---------------------------------------------------------------------------

def round_trip_cases():
    return [pytest.param(lambda: Config(), id="defaults")] + [
        pytest.param(lambda p=p: load_config(p), id=config_id(p)) for p in CONFIGS
    ] + [pytest.param(lambda: load_config(None, [
        "vocab.extra_specials=[<x>]", "optim.learning_rate=0.25", "mesh.ici={data: 2, fsdp: -1}",
        "model.streams=[{name: a, ranges: [text]}, {name: b, ranges: [ac0], head: depth}]",
    ]), id="overridden")]


@pytest.mark.parametrize("make", round_trip_cases())
def test_dict_round_trip(make):
    config = make()
    data = config_to_dict(config)
    assert isinstance(data["model"]["streams"][0], dict), "a plain dict all the way down"
    assert config_from_dict(data) == config
    assert config_from_dict(json.loads(json.dumps(data))) == config  # as stored in checkpoints
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == config  # as `slm config`


def test_round_trip_is_not_vacuous():
    data = config_to_dict(Config())
    data["model"]["streams"][0]["head"] = "depth"
    assert config_from_dict(data) != Config()


def test_commands_find_the_shipped_configs_from_any_directory(tmp_path, monkeypatch):
    from slm.cli.args import shipped_config

    monkeypatch.chdir(tmp_path)
    found = Path(shipped_config("configs/tiny/spoken.yaml"))
    assert found.is_absolute() and load_config(found).strategy.name == "parallel"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("seed: 1\n")
    assert shipped_config("configs/mine.yaml") == "configs/mine.yaml"  # a local file wins
    assert shipped_config("missing.yaml") == "missing.yaml"  # left for load_config to name
