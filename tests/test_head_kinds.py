"""Head kinds are plug-ins: one registered from `tests/` trains through the unchanged
trainer and leaves the sampler's built-in heads alone."""

import jax
import numpy as np
import pytest

import tests.ctc_head  # noqa: F401  registers the "test_ctc" head kind
from slm.config import load_config
from slm.errors import ConfigError
from slm.train.trainer import train
from tests.conftest import REPO

STREAMS = ("model.streams=[{name: text, ranges: [specials, text], head: temporal}, "
           "{name: spoken, ranges: [units], head: test_ctc}]")


def _config(*overrides):
    return load_config(f"{REPO}/configs/tiny/synthetic.yaml",
                       ["vocab.num_units=16", STREAMS, "data.seq_len=16", *overrides])


def test_a_registered_head_kind_trains_through_the_trainer(single_mesh):
    result = train(_config("train.steps=60", "model.head_options={test_ctc: {upsample: 2}}"),
                   mesh=single_mesh, progress=False)
    first, last = result.history[0], result.history[-1]
    assert last["invalid_targets"] == 0
    assert last["loss/spoken"] < 0.5 * first["loss/spoken"]  # the CTC head learns its stream
    assert last["loss/text"] < first["loss/text"]
    model = result.plan.model(result.state.params)
    assert model.head_kind_index == {"test_ctc": (1,)}
    assert model.head_kinds["test_ctc"].out[0].kernel.shape == (64, 16 + 1)  # units + blank


def test_unknown_head_kinds_and_stray_options_are_named_errors(single_mesh):
    with pytest.raises(ConfigError, match="head 'nope' is not a head kind.*test_ctc"):
        train(_config("train.steps=1", STREAMS.replace("test_ctc", "nope")),
              mesh=single_mesh, progress=False)
    with pytest.raises(ConfigError, match=r"head_options has options for \['other'\]"):
        train(_config("train.steps=1", "model.head_options={other: {}}"),
              mesh=single_mesh, progress=False)


def test_the_sampler_fills_plug_in_streams_and_samples_the_rest(single_mesh):
    from flax import nnx

    from slm.model import SpeechLM
    from slm.sample import GREEDY, Sampler
    from slm.strategies.policy import DecodePolicy, RuleBuilder
    from slm.train.trainer import vocab_from_config
    from slm.types import build_streams

    config = _config()
    vocab = vocab_from_config(config)
    model = SpeechLM(config.model, vocab, nnx.Rngs(0))
    text, spoken = build_streams(config.model, vocab)
    eos = vocab.eos_id
    rules = (RuleBuilder(text).phase("text", vocab.ids("text").tolist() + [eos]).on("text", [eos], "end")
             .phase("end", [vocab.pad_id], final=True).build(start="text", fill=vocab.pad_id),
             RuleBuilder(spoken).phase("idle", vocab.ids("units")[:1], final=True)
             .build(start="idle", fill=-1))
    sampler = Sampler(model, DecodePolicy(rules), vocab, (GREEDY, GREEDY), max_steps=6)
    out = sampler(np.array([[[vocab.bos_id], [-1]]], np.int32), jax.random.key(0))
    tokens = np.asarray(out.tokens)[0]
    assert np.all(tokens[1] == -1) and np.all(np.isin(tokens[0], vocab.ids("text", "specials")))
