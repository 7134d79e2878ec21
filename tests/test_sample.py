"""The on-device sampler equals a plain recompute-everything sampler, and obeys the policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from slm.config import DepthConfig, ModelConfig, StreamConfig
from slm.model import SpeechLM, to_flat, to_local
from slm.sample import GREEDY, Sampler, StreamSampling, sample_logits
from slm.strategies.interleaved import Interleaved
from slm.strategies.policy import DecodePolicy, RuleBuilder
from slm.types import Segment
from slm.vocab import Vocab

nnx.use_eager_sharding(False)
VOCAB = Vocab.build(text_size=30, num_units=20, num_codebooks=2, codebook_size=8)
STEPS = 12


@nnx.jit
def _full(model: SpeechLM, tokens):
    """Full-sequence logits and hidden states (no cache); causal, so padding after t is inert."""
    positions = jnp.arange(tokens.shape[2])[None]
    return model(tokens).temporal, model.decoder(model.embed(tokens, jnp.float32), positions)[0]


@nnx.jit
def _depth(model: SpeechLM, h, prev):
    return model.depth(h, prev)


def reference_greedy(model: SpeechLM, policy: DecodePolicy, prompt_kt: np.ndarray, steps: int):
    """Greedy decoding by full forward passes (no cache), one row: the sampler's specification."""
    length = prompt_kt.shape[1]
    tokens = np.zeros((1, prompt_kt.shape[0], length + steps), np.int32)
    tokens[0, :, :length] = prompt_kt
    phase = [r.start for r in policy.rules]
    reply = []
    for step in range(steps):
        t = length + step - 1  # the position whose output predicts this step
        temporal, hidden = _full(model, jnp.asarray(tokens))
        column = [0] * len(model.streams)

        def pick(k, logits):
            rule = policy.rules[k]
            if step < rule.delay or rule.final[phase[k]]:
                return rule.fill
            masked = np.where(rule.allowed[phase[k]], np.asarray(logits), -np.inf)
            local = int(np.argmax(masked))
            phase[k] = int(rule.next_phase[phase[k], local])
            return int(to_flat(jnp.array(local), model.streams[k].spans))

        for i, k in enumerate(model.temporal_index):
            column[k] = pick(k, temporal[i][0, t])
        if model.depth is not None:
            h = hidden[:, t:t + 1]
            prev = np.zeros((1, 1, len(model.depth_index)), np.int32)
            prev[..., 0] = column[model.depth_cond_index]
            for q, k in enumerate(model.depth_index):
                logits = _depth(model, h, jnp.asarray(prev))[0, 0, q]
                column[k] = pick(k, logits)
                if q + 1 < len(model.depth_index):
                    prev[..., q + 1] = column[k]
        reply.append(column)
        if all(r.final[p] for r, p in zip(policy.rules, phase)):
            break
        tokens[0, :, length + step] = column
    return np.array(reply).T  # [K, steps taken]


def _model(streams, depth=None, seed=0):
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      streams=streams, depth=depth or DepthConfig())
    return SpeechLM(cfg, VOCAB, nnx.Rngs(seed))


def test_interleaved_sampler_matches_recompute_reference():
    strategy = Interleaved()
    model = _model(strategy.streams(VOCAB))
    prompt = strategy.prompt([Segment("user", "speech", units=VOCAB.ids("units")[:5])], VOCAB).tokens
    policy = strategy.policy(VOCAB)
    out = Sampler(model, policy, VOCAB, sampling=(GREEDY,), max_steps=STEPS)(prompt[None], jax.random.key(0))
    want = reference_greedy(model, policy, prompt, STEPS)
    np.testing.assert_array_equal(np.asarray(out.tokens[0])[:, :want.shape[1]], want)


def _depth_model_and_policy(ac_delay):
    streams = [StreamConfig("text", ["specials", "text"]), StreamConfig("semantic", ["specials", "units"]),
               StreamConfig("ac0", ["specials", "ac0"], "depth"), StreamConfig("ac1", ["specials", "ac1"], "depth")]
    model = _model(streams, DepthConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                                        mlp_dim=32, cond_stream="semantic"))
    specs = model.streams
    eosp, pad = VOCAB.special("<eosp>"), VOCAB.pad_id
    text = RuleBuilder(specs[0]).phase("free", VOCAB.ids("text"), final=True).build("free", fill=pad)
    rules = [text]
    for k, name in [(1, "units"), (2, "ac0"), (3, "ac1")]:
        rule = (RuleBuilder(specs[k]).phase("speech", [*VOCAB.ids(name), eosp])
                .phase("done", [pad], final=True).on("speech", [eosp], "done"))
        rules.append(rule.build("speech", fill=pad, delay=0 if k == 1 else ac_delay))
    return model, DecodePolicy(tuple(rules))


@pytest.mark.parametrize("ac_delay", [0, 2])
def test_depth_sampler_matches_recompute_reference(ac_delay):
    model, policy = _depth_model_and_policy(ac_delay)
    prompt = np.full((4, 3), VOCAB.pad_id, np.int32)
    out = Sampler(model, policy, VOCAB, sampling=(GREEDY,) * 4, max_steps=STEPS)(prompt[None], jax.random.key(0))
    want = reference_greedy(model, policy, prompt, STEPS)
    got = np.asarray(out.tokens[0])[:, :want.shape[1]]
    np.testing.assert_array_equal(got, want)
    # delayed acoustic streams emit the fill first; audio is complete once every speech stream
    # has emitted an audio id
    assert np.all(got[2:, :ac_delay] == VOCAB.pad_id)
    audio = [np.isin(got[k], VOCAB.ids(name)) for k, name in [(1, "units"), (2, "ac0"), (3, "ac1")]]
    complete = np.logical_and.reduce([np.cumsum(a) > 0 for a in audio])
    assert int(out.first_audio[0]) == (int(np.argmax(complete)) if complete.any() else -1)


def test_forced_modality_never_samples_the_other_one():
    model = _model(Interleaved().streams(VOCAB), seed=3)
    for force, banned in [("speech", "text"), ("text", "units")]:
        strategy = Interleaved(force=force)
        prompt = strategy.prompt([Segment("user", "text", text=VOCAB.ids("text")[:4])], VOCAB).tokens
        sampler = Sampler(model, strategy.policy(VOCAB), VOCAB,
                          sampling=(StreamSampling(temperature=1.0),), max_steps=STEPS)
        out = sampler(np.repeat(prompt[None], 4, axis=0), jax.random.key(1))
        tokens = np.asarray(out.tokens)
        assert not np.isin(tokens, VOCAB.ids(banned)).any()


def test_sample_logits_respects_mask_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    allowed = jnp.ones_like(logits, bool)
    keys = jax.random.key(0)
    top2 = sample_logits(keys, logits, allowed, StreamSampling(1.0, top_k=2))
    assert set(np.asarray(top2).tolist()) == {0, 1}
    nucleus = sample_logits(keys, logits, allowed, StreamSampling(1.0, top_p=0.7))
    assert set(np.asarray(nucleus).tolist()) == {0, 1}
    masked = sample_logits(keys, logits, allowed.at[:, 0].set(False), StreamSampling(1.0))
    assert 0 not in set(np.asarray(masked).tolist())
    assert np.all(np.asarray(sample_logits(keys, logits, allowed, GREEDY)) == 0)


def test_sampler_stops_when_every_stream_is_final():
    model, policy = _depth_model_and_policy(1)
    out = Sampler(model, policy, VOCAB, max_steps=64)(np.zeros((2, 4, 3), np.int32), jax.random.key(2))
    tokens, length = np.asarray(out.tokens), np.asarray(out.length)
    for row in range(2):
        if length[row] < 64:  # finished: everything after the end is fill
            assert np.all(tokens[row, :, length[row]:] == VOCAB.pad_id)
            eosp = VOCAB.special("<eosp>")
            assert all((tokens[row, k, :length[row]] == eosp).sum() == 1 for k in (1, 2, 3))
    assert to_local(jnp.array([VOCAB.special("<eosp>")]), model.streams[1].spans)[0] >= 0


def test_guidance_scale_one_matches_unguided_and_guidance_changes_the_reply():
    strategy = Interleaved()
    model = _model(strategy.streams(VOCAB), seed=5)
    prompt = strategy.prompt([Segment("user", "speech", units=VOCAB.ids("units")[:6])], VOCAB).tokens
    policy = strategy.policy(VOCAB)

    def run(scale):
        sampler = Sampler(model, policy, VOCAB, sampling=(GREEDY,), max_steps=STEPS, cfg_scale=scale)
        return np.asarray(sampler(np.repeat(prompt[None], 2, 0), jax.random.key(0)).tokens)

    plain = np.asarray(Sampler(model, policy, VOCAB, sampling=(GREEDY,), max_steps=STEPS)(
        np.repeat(prompt[None], 2, 0), jax.random.key(0)).tokens)
    np.testing.assert_array_equal(run(1.0), plain)
    guided = run(3.0)
    assert guided.shape == plain.shape and not np.array_equal(guided, plain)
    # the guided logits are uncond + s * (cond - uncond): s = 0 samples the unconditional model
    unconditional = run(0.0)
    masked = np.where(prompt >= VOCAB.range("specials").stop, -1, prompt)
    want = reference_greedy(model, policy, masked, STEPS)
    np.testing.assert_array_equal(unconditional[0][:, :want.shape[1]], want)


def test_prompts_of_different_lengths_share_a_batch_and_one_compiled_prefill():
    strategy = Interleaved()
    model = _model(strategy.streams(VOCAB), seed=7)
    policy = strategy.policy(VOCAB)
    prompts = [strategy.prompt([Segment("user", "speech", units=VOCAB.ids("units")[:n])], VOCAB).tokens
               for n in (3, 9)]
    assert prompts[0].shape[1] != prompts[1].shape[1]
    sampler = Sampler(model, policy, VOCAB, sampling=(GREEDY,), max_steps=STEPS)
    out = np.asarray(sampler(prompts, jax.random.key(0)).tokens)
    for row, prompt in enumerate(prompts):  # left padding is invisible to each row
        want = reference_greedy(model, policy, prompt, STEPS)
        np.testing.assert_array_equal(out[row][:, :want.shape[1]], want)
    single = Sampler(model, policy, VOCAB, sampling=(GREEDY,), max_steps=STEPS)
    for prompt in prompts:
        single([prompt], jax.random.key(0))
    assert single._start._cache_size() == 1  # both lengths fall in one bucket: one prefill


@pytest.mark.parametrize("mesh_sizes", [{"tensor": 2}, {"data": 2, "tensor": 2}],
                         ids=["tensor=2", "data=2,tensor=2"])
def test_greedy_reply_on_a_mesh_equals_the_single_device_reply(mesh_sizes):
    """Tensor parallel (heads, MLP and vocabulary split, each device caching its own key/value
    heads), with and without rows split over `data`; the 8 simulated CPU devices of
    tests/conftest.py."""
    from slm.config import MeshConfig
    from slm.parallel.mesh import make_mesh

    model, policy = _depth_model_and_policy(1)
    prompts = [np.full((4, n), VOCAB.pad_id, np.int32) for n in (3, 7)]
    prompts[1][1, 2:] = VOCAB.ids("units")[:5]
    size = int(np.prod(list(mesh_sizes.values())))
    mesh = make_mesh(MeshConfig(ici=mesh_sizes), jax.devices()[:size])
    one = Sampler(model, policy, VOCAB, sampling=(GREEDY,) * 4, max_steps=STEPS)
    sharded = Sampler(model, policy, VOCAB, sampling=(GREEDY,) * 4, max_steps=STEPS, mesh=mesh)
    want = one(prompts, jax.random.key(0))
    assert np.isin(np.asarray(want.tokens), VOCAB.ids("ac0")).any()  # a reply, not only fills
    loop = sharded.start(prompts, jax.random.key(0), STEPS)
    cache = loop.state.cache[0].k  # [B, Kv, S, H]: rows over data, key/value heads over tensor
    rows = "data" if mesh_sizes.get("data", 1) > 1 else None
    assert cache.sharding.spec == PartitionSpec(rows, "tensor", None, None)
    wq = sharded.params["decoder"]["layers"]["attn"]["wq"]
    assert wq.sharding.spec == PartitionSpec(None, None, "tensor", None)
    got = sharded.result(sharded.advance(loop, STEPS))
    assert len(got.tokens.sharding.device_set) == size
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.length), np.asarray(want.length))
