"""Plug-ins: a strategy or projector from another package is found through its Python entry
point and built from the CLI like a built-in; options are checked against the plug-in's own
dataclass, naming the field; a config or checkpoint from before options moved is handled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from slm.config import StrategyConfig, load_config
from slm.errors import ConfigError
from slm.strategies import STRATEGIES, make_strategy, with_strategy_streams
from slm.vocab import Vocab
from tests.conftest import REPO, SUBPROCESS_ENV

VOCAB = Vocab.build(text_size=30, num_units=16, num_codebooks=2, codebook_size=8)

ENTRY_POINTS = """\
[slm.strategies]
word_by_word_plugin = slm_test_plugins.strategy
forgetful = slm_test_plugins.forgetful

[slm.projectors]
mean_pool = slm_test_plugins.projector:MeanPool

[slm.heads]
ctc_plugin = slm_test_plugins.head
"""

HEAD = """\
from slm.model.head_kinds import register_head_kind
from tests.ctc_head import UpsampledCTC

register_head_kind("ctc_plugin", UpsampledCTC)
"""

STRATEGY = """\
import dataclasses

from slm.strategies import register_strategy
from tests.word_by_word import WordByWord


@dataclasses.dataclass(frozen=True)
class WordByWordOptions:
    unit_rate: float = 50.0


register_strategy("word_by_word_plugin",
                  lambda options, vocab: WordByWord(unit_rate=options.unit_rate),
                  WordByWordOptions)
"""

PROJECTOR = """\
import dataclasses

import jax.numpy as jnp
from flax import nnx

from slm.model.projectors import Projector, register_projector


@dataclasses.dataclass(frozen=True)
class MeanPoolOptions:
    window: int = 2


class MeanPool(Projector):
    Options = MeanPoolOptions
    shown = ("window",)

    def __init__(self, enc_dim, d_model, options, rngs):
        super().__init__(enc_dim, d_model, options, window=options.window)
        self.w = nnx.Param(jnp.eye(enc_dim, d_model))

    def _project(self, x_bfe, mask_bf):
        b, f, e = x_bfe.shape
        return x_bfe.reshape(b, f // self.window, self.window, e).mean(2) @ self.w[...]


register_projector("mean_pool", MeanPool)
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """An installed-looking distribution (dist-info with entry points, and its package) on
    sys.path; its registrations and modules are undone afterwards."""
    from slm.model.head_kinds import HEAD_KINDS
    from slm.model.projectors import PROJECTORS

    site = tmp_path / "site"
    info = site / "slm_test_plugins-0.1.dist-info"
    package = site / "slm_test_plugins"
    info.mkdir(parents=True)
    package.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slm-test-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (package / "__init__.py").write_text("")
    (package / "strategy.py").write_text(STRATEGY)
    (package / "projector.py").write_text(PROJECTOR)
    (package / "head.py").write_text(HEAD)
    (package / "forgetful.py").write_text("# registers nothing\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    for registry, name in [(STRATEGIES, "word_by_word_plugin"), (PROJECTORS, "mean_pool"),
                           (HEAD_KINDS, "ctc_plugin")]:
        if name in registry:
            registry.unregister(name)
    for module in [m for m in sys.modules if m.split(".")[0] == "slm_test_plugins"]:
        del sys.modules[module]


# --- 1. entry points ---------------------------------------------------------------------

def test_a_strategy_installed_as_an_entry_point_is_built_from_a_config(plugin_dir):
    assert "word_by_word_plugin" in STRATEGIES.names(), "listed before it is imported"
    assert "word_by_word_plugin" not in STRATEGIES
    config = load_config(None, ["strategy.name=word_by_word_plugin", "strategy.options.unit_rate=25",
                                "vocab.num_units=16"])
    strategy = make_strategy(config.strategy, VOCAB)
    assert type(strategy).__name__ == "WordByWord" and strategy.unit_rate == 25.0
    streams = with_strategy_streams(config, VOCAB).model.streams
    assert [s.name for s in streams] == [s.name for s in strategy.streams(VOCAB)]


def test_slm_train_runs_a_strategy_from_an_entry_point(plugin_dir):
    env = dict(SUBPROCESS_ENV, PYTHONPATH=os.pathsep.join([str(plugin_dir), REPO]))
    done = subprocess.run(
        [sys.executable, "-m", "slm.cli", "train", "--config", "configs/tiny/synthetic.yaml",
         "strategy.name=word_by_word_plugin", "strategy.options.unit_rate=25",
         "vocab.num_units=16", "train.steps=2", "model.num_layers=1", "model.d_model=32",
         "model.mlp_dim=64"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"^step 2: loss \S+$", done.stdout, re.M), done.stdout


def test_slm_train_runs_a_head_kind_from_an_entry_point(plugin_dir):
    env = dict(SUBPROCESS_ENV, PYTHONPATH=os.pathsep.join([str(plugin_dir), REPO]))
    streams = ("model.streams=[{name: text, ranges: [specials, text], head: temporal}, "
               "{name: spoken, ranges: [units], head: ctc_plugin}]")
    done = subprocess.run(
        [sys.executable, "-m", "slm.cli", "train", "--config", "configs/tiny/synthetic.yaml",
         streams, "model.head_options={ctc_plugin: {upsample: 3}}", "vocab.num_units=16",
         "train.steps=2", "model.num_layers=1", "model.d_model=32", "model.mlp_dim=64"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"^step 2: loss \S+$", done.stdout, re.M), done.stdout


def test_a_projector_installed_as_an_entry_point_is_built_by_name(plugin_dir):
    import jax.numpy as jnp
    from flax import nnx

    from slm.model.projectors import build_projector

    projector = build_projector("mean_pool", 4, 4, {"window": 2}, nnx.Rngs(0))
    y, mask = projector(jnp.ones((1, 6, 4)), jnp.ones((1, 6), bool))
    assert y.shape == (1, 3, 4) and mask.shape == (1, 3)
    assert projector.describe(50.0).startswith("mean_pool window=2: 50.0 Hz -> 25.0 Hz")
    with pytest.raises(ConfigError, match=r"'projector\.size'; valid keys under 'projector' "
                                          r"are: window \(the options of projector 'mean_pool'\)"):
        build_projector("mean_pool", 4, 4, {"size": 2}, nnx.Rngs(0))


def test_an_entry_point_that_registers_nothing_says_which_call_is_missing(plugin_dir):
    with pytest.raises(ConfigError, match=r"strategy\.name='forgetful': importing its entry "
                                          r"point 'slm_test_plugins\.forgetful'.*must call "
                                          r"slm\.strategies\.register_strategy\('forgetful'"):
        make_strategy(StrategyConfig(name="forgetful"), VOCAB)


def test_an_unknown_name_lists_the_known_ones_and_how_to_add_one():
    with pytest.raises(ConfigError, match=r"strategy\.name='moshi'; choose one of "
                                          r"chain_of_modality, coarse_to_fine, interleaved, "
                                          r"parallel, text_driven \(a new strategy registers with "
                                          r"slm\.strategies\.register_strategy, or through a "
                                          r"Python entry point in group 'slm\.strategies'\)"):
        make_strategy(StrategyConfig(name="moshi"), VOCAB)


# --- 2. options are the strategy's own dataclass --------------------------------------------

@pytest.mark.parametrize("name, options, message", [
    ("parallel", {"spech": "codes"}, "unknown config key 'strategy.options.spech'; valid keys "
                                     "under 'strategy.options' are: delays, speech (the options "
                                     "of strategy 'parallel')"),
    ("parallel", {"task": "tts"}, "unknown config key 'strategy.options.task'"),
    ("parallel", {"delays": [0, "1"]}, "strategy.options.delays[1]: expected int, got '1'"),
    ("coarse_to_fine", {"acoustic_delay": 1.5}, "strategy.options.acoustic_delay: expected int"),
    ("coarse_to_fine", {"user_codes": "no"}, "strategy.options.user_codes: expected bool"),
    ("interleaved", {"force_modality": "video"}, "strategy 'interleaved' with strategy.options "
                                                 "InterleavedOptions(force_modality='video'): "
                                                 "force='video'; choose None, 'text' or 'speech'"),
    ("chain_of_modality", {"task": "translate"}, "ChainOfModalityOptions(task='translate'): "
                                                 "task='translate'; choose one of"),
])
def test_bad_options_name_the_field(name, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_strategy(StrategyConfig(name=name, options=options), VOCAB)


def test_options_reach_each_built_in_strategy():
    def built(name: str, **options):
        return make_strategy(StrategyConfig(name=name, options=options), VOCAB)

    assert built("interleaved", force_modality="text").force == "text"
    assert built("chain_of_modality", task="tts").task == "tts"
    assert built("parallel", speech="codes", delays=[0, 2, 3]).delays == [0, 2, 3]
    assert built("coarse_to_fine", acoustic_delay=2, user_codes=False).user_codes is False


def test_a_data_task_sets_the_task_option_of_strategies_that_have_one():
    chain = StrategyConfig(name="chain_of_modality", options={"task": "answer"})
    assert make_strategy(chain, VOCAB, data_task="asr").task == "transcribe"
    assert make_strategy(chain, VOCAB, data_task="dialogue").task == "answer"
    assert make_strategy(StrategyConfig(name="parallel"), VOCAB, data_task="asr").name == "parallel"


def test_options_are_written_in_yaml_under_the_strategy(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("strategy: {name: parallel, options: {speech: codes, delays: [0, 1, 1]}}\n")
    config = load_config(path, ["strategy.options.delays=[0, 2, 2]"])
    assert config.strategy.options == {"speech": "codes", "delays": [0, 2, 2]}
    assert len(with_strategy_streams(config, VOCAB).model.streams) == 1 + VOCAB.num_codebooks


# --- 3. configs and checkpoints from before options moved -----------------------------------

@pytest.mark.parametrize("how", ["yaml", "override"])
def test_an_old_style_option_fails_naming_its_new_place(tmp_path, how):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""\
        strategy:
          name: chain_of_modality
          task: transcribe
        """) if how == "yaml" else "strategy: {name: chain_of_modality}\n")
    overrides = ["strategy.task=transcribe"] if how == "override" else []
    with pytest.raises(ConfigError, match=r"'strategy\.task' moved to 'strategy\.options\.task'.*"
                                          r"override strategy\.options\.task=<value>"):
        load_config(path, overrides)


def test_a_checkpoint_config_with_flat_options_is_migrated():
    from slm.config import config_from_dict, config_to_dict
    from slm.train.checkpoint import _with_strategy_options

    saved = config_to_dict(load_config(None, ["strategy.name=coarse_to_fine"]))
    saved["strategy"] = {"name": "coarse_to_fine", "force_modality": "", "task": "answer",
                         "speech": "units", "delays": [], "acoustic_delay": 2, "user_codes": False,
                         "dedup_input_units": True}
    strategy = config_from_dict(_with_strategy_options(saved)).strategy
    assert strategy == StrategyConfig(name="coarse_to_fine",
                                      options={"acoustic_delay": 2, "user_codes": False})
