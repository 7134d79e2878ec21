"""The model: cached decoding vs full sequences, depth decoder, heads, loss, embeddings, configs.

Everything runs on tiny fp32 models on CPU. Two things keep the file fast:
- parameters are drawn with the `rbg` PRNG (`jax.random.key(seed, impl="rbg")`), whose
  random ops compile an order of magnitude faster than threefry's; the init code is unchanged;
- forward passes, decode steps and gradients run under `nnx.jit` (eager op-by-op execution of a
  whole model costs seconds per call).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slm.config import DepthConfig, ModelConfig, StreamConfig
from slm.errors import ConfigError
from slm.model import SpeechLM, to_flat, to_local
from slm.model.precision import compute_dtype
from slm.types import build_streams
from slm.vocab import Vocab

nnx.use_eager_sharding(False)  # params carry logical axis names; no mesh in these tests

VOCAB = Vocab.build(text_size=50, num_units=20, num_codebooks=3, codebook_size=16)

TEMPORAL_STREAMS = (("text", ("specials", "text")), ("sem", ("specials", "units")))
DEPTH_STREAMS = (("a0", ("ac0",)), ("a1", ("ac1",)), ("a2", ("ac2",)))


def make_cfg(*, depth: bool = False, **overrides) -> ModelConfig:
    """A tiny model: text + semantic temporal streams, optionally three depth codebook streams."""
    streams = [StreamConfig(n, list(r), "temporal") for n, r in TEMPORAL_STREAMS]
    kw = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
    if depth:
        streams += [StreamConfig(n, list(r), "depth") for n, r in DEPTH_STREAMS]
        kw["depth"] = DepthConfig(num_layers=2, d_model=16, num_heads=2, num_kv_heads=1,
                                  mlp_dim=32, cond_stream="sem")
    kw["streams"] = streams
    kw.update(overrides)
    return ModelConfig(**kw)


def build(cfg: ModelConfig, seed: int = 0) -> SpeechLM:
    return SpeechLM(cfg, VOCAB, nnx.Rngs(params=jax.random.key(seed, impl="rbg")))


# Shared models and shapes: nnx.jit caches compilations per (model structure, input shapes), and
# on CPU compiling dominates these tests, so tests reuse the same few models, B=2, T=7, S=10.
B, T, CAPACITY = 2, 7, 10
DEFAULTS = dict(depth=False, num_kv_heads=2, scan_layers=True, remat="none", dtype="float32",
                stream_combine="sum", tie_embeddings=False)


def model_for(**overrides) -> SpeechLM:
    """A shared model for tests that only read it; same overrides, same (cached) object."""
    return _cached_model(tuple(sorted({**DEFAULTS, **overrides}.items())))


@functools.lru_cache(maxsize=None)
def _cached_model(key: tuple) -> SpeechLM:
    return build(make_cfg(**dict(key)))


def stream_ids(spans) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in spans])


def random_tokens(model: SpeechLM, seed: int = 0, batch: int = B, steps: int = T) -> jax.Array:
    """`[B, K, T]` int32, each stream's tokens drawn from its own vocabulary spans."""
    rng = np.random.default_rng(seed)
    rows = [rng.choice(stream_ids(s.spans), (batch, steps)) for s in model.streams]
    return jnp.asarray(np.stack(rows, axis=1), jnp.int32)


def perturb(model: SpeechLM, tokens, k: int, t: int, shift: int = 5) -> jax.Array:
    """`tokens` with stream k's token at step t (all batch rows) moved to another id of the stream."""
    ids = stream_ids(model.streams[k].spans)
    pos = np.searchsorted(ids, np.asarray(tokens[:, k, t]))
    return tokens.at[:, k, t].set(jnp.asarray(ids[(pos + shift) % len(ids)], jnp.int32))


@nnx.jit
def forward(model: SpeechLM, tokens):
    out = model(tokens)
    return out.temporal, out.depth


@nnx.jit
def decode(model: SpeechLM, tokens, state):
    return model.decode(tokens, state)


@nnx.jit
def depth_decode(model: SpeechLM, h_nd, prev_nq):
    """Cached depth decoding, one codebook step at a time (teacher-forced): `[N, Q, C]`."""
    cache = model.depth.init_cache(h_nd.shape[0])
    logits = []
    for q in range(prev_nq.shape[1]):
        logits_nc, cache = model.depth.step(h_nd, prev_nq[:, q], q, cache)
        logits.append(logits_nc)
    return jnp.stack(logits, axis=1)


@nnx.jit
def loss_fn(model: SpeechLM, tokens, weights):
    return model.loss(tokens, weights)


@nnx.jit
def embed_fn(model: SpeechLM, tokens):
    return model.embed(tokens, jnp.float32)


def decode_in_chunks(model: SpeechLM, tokens, chunks, capacity: int = CAPACITY):
    """Feed `tokens` through the cache in chunks of the given lengths; concatenated outputs."""
    state = model.init_decode_state(tokens.shape[0], capacity)
    hs, logits, t = [], [], 0
    for n in chunks:
        h, lg, state = decode(model, tokens[:, :, t:t + n], state)
        hs.append(h)
        logits.append(lg)
        t += n
    assert t == tokens.shape[2] and int(state.index) == t
    per_stream = [jnp.concatenate([lg[i] for lg in logits], axis=1) for i in range(len(logits[0]))]
    return jnp.concatenate(hs, axis=1), per_stream


def params_of(model: SpeechLM):
    return nnx.state(model, nnx.Param)


def assert_trees_close(a, b, atol, rtol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# --- cached decoding ---------------------------------------------------------------------

@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_stepwise_decode_matches_full_sequence(num_kv_heads, scan):
    model = model_for(num_kv_heads=num_kv_heads, scan_layers=scan)
    assert model.spec.num_heads == 4 and model.spec.num_kv_heads == num_kv_heads
    tokens = random_tokens(model, seed=1)
    full, _ = forward(model, tokens)
    # CAPACITY > T: the unwritten (zero) cache slots must be masked out
    _, stepped = decode_in_chunks(model, tokens, [1] * T)
    assert len(stepped) == len(full) == 2
    for a, b in zip(stepped, full):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan, chunks", [(True, [4, 1, 1, 1]), (True, [3, 3, 1]),
                                          (False, [3, 3, 1])], ids=str)
def test_prefill_then_steps_matches_full_sequence(scan, chunks):
    model = model_for(scan_layers=scan)
    tokens = random_tokens(model, seed=2)
    full, _ = forward(model, tokens)
    _, chunked = decode_in_chunks(model, tokens, chunks)
    for a, b in zip(chunked, full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_decode_state_bookkeeping():
    model = model_for()
    state = model.init_decode_state(B, CAPACITY)
    assert state.capacity == CAPACITY and int(state.index) == 0
    assert state.cache.k.shape == (2, B, 2, CAPACITY, 8)  # [layers, B, Kv, S, head_dim]
    assert state.cache.v.shape == (2, B, 2, 8, CAPACITY)  # [layers, B, Kv, head_dim, S]
    h, logits, state = decode(model, random_tokens(model)[:, :, :3], state)
    assert h.shape == (B, 3, 32) and int(state.index) == 3
    assert [lg.shape[:2] for lg in logits] == [(B, 3), (B, 3)]
    # the written slots hold keys and values, the rest of the cache is untouched
    for kv in (state.cache.k, np.swapaxes(state.cache.v, -1, -2)):
        assert np.all(np.asarray(kv[:, :, :, 3:]) == 0)
        assert np.all(np.any(np.asarray(kv[:, :, :, :3]) != 0, axis=-1))


# --- depth decoder -----------------------------------------------------------------------

def test_depth_steps_with_cache_match_teacher_forced_depth_logits():
    model = model_for(depth=True)
    tokens = random_tokens(model, seed=3)
    _, depth = forward(model, tokens)
    q_count, c = len(model.depth_index), 16
    assert depth.shape == (B, T - 1, q_count, c)

    h, _ = decode_in_chunks(model, tokens, [T])  # temporal output from one prefill
    n = B * (T - 1)
    h_nd = h[:, :-1].reshape(n, -1)  # step t's output predicts the depth tokens of step t+1
    prev_nq = model._depth_inputs(tokens[:, :, 1:]).reshape(n, q_count)
    # depth step 0 is conditioned on the semantic token of the same frame, step q on codebook q-1
    expected_rows = [1, 2, 3]  # sem, a0, a1
    for q, k in enumerate(expected_rows):
        np.testing.assert_array_equal(np.asarray(prev_nq[:, q]), np.asarray(tokens[:, k, 1:]).reshape(n))
    assert model.depth.init_cache(n).k.shape[3] == q_count

    stepped = depth_decode(model, h_nd, prev_nq)
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(depth).reshape(n, q_count, c),
                               atol=1e-5, rtol=0)


def test_depth_logits_are_causal_over_codebooks():
    """Depth step q sees only tokens coarser than q: changing codebook 1 of a frame changes the
    logits of step 2 of that frame (its input), not steps 0..1, and no other frame."""
    model = model_for(depth=True)
    tokens = random_tokens(model, seed=4)
    frame = 3  # token step; depth position frame-1 predicts it
    changed = perturb(model, tokens, [s.name for s in model.streams].index("a1"), frame)
    (_, d0), (_, d1) = forward(model, tokens), forward(model, changed)
    d0, d1 = np.asarray(d0), np.asarray(d1)
    np.testing.assert_allclose(d1[:, frame - 1, :2], d0[:, frame - 1, :2], atol=1e-6, rtol=0)
    assert max_diff(d1[:, frame - 1, 2], d0[:, frame - 1, 2]) > 1e-3
    # other frames see neither the change in their inputs nor (earlier ones) in h
    np.testing.assert_allclose(d1[:, :frame - 1], d0[:, :frame - 1], atol=1e-6, rtol=0)


# --- scanning, remat ---------------------------------------------------------------------

def test_scan_and_unrolled_share_params_and_logits():
    scanned, unrolled = model_for(scan_layers=True), model_for(scan_layers=False)
    p_scan, p_loop = params_of(scanned), params_of(unrolled)
    assert jax.tree.structure(p_scan) == jax.tree.structure(p_loop)
    assert_trees_close(p_scan, p_loop, atol=0)  # same seed, same values: a checkpoint fits both
    # parameters are stacked over layers either way
    for m in (scanned, unrolled):
        assert m.decoder.layers.attn.wq.shape == (2, 32, 4, 8)
        assert m.decoder.layers.attn.wk.shape == (2, 32, 2, 8)
        assert m.decoder.layers.mlp.w_up.shape == (2, 32, 64)
        assert m.decoder.layers.attn_norm.scale.shape == (2, 32)
    tokens = random_tokens(scanned)
    assert_trees_close(forward(scanned, tokens), forward(unrolled, tokens), atol=1e-5)


def _remat_batch():
    tokens = random_tokens(model_for(), seed=5)
    weights = jnp.asarray(np.random.default_rng(5).uniform(0, 1, tokens.shape), jnp.float32)
    return tokens, weights


def _loss_and_grads(model: SpeechLM):
    tokens, weights = _remat_batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def mean_loss(p):
        loss_sum, weight_sum, _ = nnx.merge(graphdef, p, rest).loss(tokens, weights)
        return loss_sum / weight_sum

    return jax.jit(jax.value_and_grad(mean_loss))(params)


@functools.lru_cache(maxsize=None)
def _reference_loss_and_grads():
    return _loss_and_grads(model_for())  # remat "none", scanned


@pytest.mark.parametrize("remat, scan", [("full", True), ("dots", True), ("dots_no_batch", True),
                                         ("offload", True), ("full", False)], ids=str)
def test_remat_policies_give_same_loss_and_grads(remat, scan):
    loss0, grads0 = _reference_loss_and_grads()
    assert np.isfinite(float(loss0))
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads0))
    model = build(make_cfg(remat=remat, scan_layers=scan))
    assert model.decoder.remat == remat
    assert_trees_close(params_of(model), params_of(model_for()), atol=0)
    loss, grads = _loss_and_grads(model)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    assert_trees_close(grads, grads0, atol=1e-6, rtol=1e-5)


def test_bad_remat_policy_is_rejected():
    with pytest.raises(ConfigError, match="model.remat='some'.*dots_no_batch"):
        _construct(make_cfg(remat="some"))


# --- heads and streams -------------------------------------------------------------------

def test_tied_heads_read_embedding_rows():
    tied, untied = model_for(tie_embeddings=True), model_for()
    assert not hasattr(tied.heads, "w")
    tied_paths = {p for p, _ in nnx.to_flat_state(params_of(tied))}
    untied_paths = {p for p, _ in nnx.to_flat_state(params_of(untied))}
    assert untied_paths - tied_paths == {("heads", "w")}
    assert not any(p[0] == "heads" for p in tied_paths)

    tokens = random_tokens(tied, seed=6)
    h, logits = decode_in_chunks(tied, tokens, [T])
    full, _ = forward(tied, tokens)
    table = np.asarray(tied.embed.table[...], np.float64)
    h = np.asarray(h, np.float64)
    for stream, lg, lg_full in zip((s for s in tied.streams if s.head == "temporal"), logits, full):
        expected = h @ table[stream_ids(stream.spans)].T
        np.testing.assert_allclose(np.asarray(lg), expected, atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(lg_full), expected, atol=1e-4, rtol=1e-5)


def test_temporal_heads_cover_exactly_their_stream_ranges():
    model = model_for(depth=True)
    specials, text, units = (VOCAB.range(n) for n in ("specials", "text", "units"))
    spans = {s.name: s.spans for s in model.streams}
    # adjacent ranges merge into one span; non-adjacent ones stay apart, in id order
    assert spans["text"] == ((specials.start, text.stop),)
    assert spans["sem"] == ((specials.start, specials.stop), (units.start, units.stop))
    assert spans["a1"] == ((VOCAB.range("ac1").start, VOCAB.range("ac1").stop),)

    temporal, depth = forward(model, random_tokens(model))
    assert [lg.shape for lg in temporal] == [(B, T, specials.size + text.size),
                                            (B, T, specials.size + units.size)]
    assert all(lg.dtype == jnp.float32 for lg in temporal)
    assert depth.shape == (B, T - 1, 3, 16)
    assert model.heads.w.shape == (32, specials.size + text.size + specials.size + units.size)


@pytest.mark.parametrize("ranges", [["specials", "text"], ["specials", "units"], ["units", "ac2"],
                                    ["ac1"], ["reserved", "specials", "ac0"]], ids=str)
def test_to_local_to_flat_round_trip(ranges):
    (stream,) = build_streams(make_cfg(streams=[StreamConfig("s", ranges)]), VOCAB)
    assert stream.size == sum(VOCAB.range(n).size for n in ranges)
    ids = jnp.arange(-3, VOCAB.size + 3, dtype=jnp.int32)
    local = np.asarray(to_local(ids, stream.spans))
    inside = np.isin(np.asarray(ids), VOCAB.ids(*ranges))
    assert np.all(local[~inside] == -1)
    # the stream's ids map, in order, onto 0..V_k-1, and back
    np.testing.assert_array_equal(local[inside], np.arange(stream.size))
    back = np.asarray(to_flat(jnp.asarray(local[inside]), stream.spans))
    np.testing.assert_array_equal(back, np.asarray(ids)[inside])


# --- loss --------------------------------------------------------------------------------

def _manual_xent(logits, targets, spans, weights):
    """Reference weighted NLL sum in numpy (float64)."""
    logits = np.asarray(logits, np.float64)
    local = np.asarray(to_local(jnp.asarray(targets), spans))
    top = logits.max(-1)
    logz = np.log(np.exp(logits - top[..., None]).sum(-1)) + top
    picked = np.take_along_axis(logits, np.maximum(local, 0)[..., None], -1)[..., 0]
    w = np.where(local >= 0, np.asarray(weights, np.float64), 0.0)
    return float(np.sum((logz - picked) * w)), float(w.sum())


def test_loss_matches_reference_cross_entropy():
    model = model_for(depth=True)
    tokens = random_tokens(model, seed=7)
    weights = jnp.asarray(np.random.default_rng(7).uniform(0, 2, tokens.shape), jnp.float32)
    temporal, depth = forward(model, tokens)
    loss_sum, weight_sum, metrics = loss_fn(model, tokens, weights)
    total_loss = total_weight = 0.0
    for k, s in enumerate(model.streams):
        if s.head == "temporal":
            logits = temporal[model.temporal_index.index(k)][:, :-1]  # step t predicts t+1
        else:
            logits = depth[:, :, model.depth_index.index(k)]
        ls, ws = _manual_xent(logits, tokens[:, k, 1:], s.spans, weights[:, k, 1:])
        np.testing.assert_allclose(float(metrics[f"loss_sum/{s.name}"]), ls, rtol=1e-5)
        np.testing.assert_allclose(float(metrics[f"weight_sum/{s.name}"]), ws, rtol=1e-5)
        total_loss, total_weight = total_loss + ls, total_weight + ws
    np.testing.assert_allclose(float(loss_sum), total_loss, rtol=1e-5)
    np.testing.assert_allclose(float(weight_sum), total_weight, rtol=1e-5)
    assert int(metrics["invalid_targets"]) == 0


@pytest.mark.parametrize("stream", ["sem", "a1"])
def test_zero_weight_stream_is_ignored(stream):
    model = model_for(depth=True)
    k = [s.name for s in model.streams].index(stream)
    tokens = random_tokens(model, seed=8)
    weights = jnp.ones(tokens.shape, jnp.float32)
    loss_all, w_all, m_all = loss_fn(model, tokens, weights)
    loss_wo, w_wo, m_wo = loss_fn(model, tokens, weights.at[:, k].set(0.0))
    assert float(m_wo[f"loss_sum/{stream}"]) == 0 and float(m_wo[f"weight_sum/{stream}"]) == 0
    others = [s.name for s in model.streams if s.name != stream]
    np.testing.assert_allclose(float(loss_wo), sum(float(m_all[f"loss_sum/{n}"]) for n in others),
                               rtol=1e-6)
    assert float(w_wo) == float(w_all) - B * (T - 1)
    for n in others:  # the other streams keep their losses and weights
        assert float(m_wo[f"weight_sum/{n}"]) == float(m_all[f"weight_sum/{n}"])
        assert float(m_wo[f"loss_sum/{n}"]) == float(m_all[f"loss_sum/{n}"])


def test_invalid_targets_are_counted_and_excluded():
    model = model_for(depth=True)
    names = [s.name for s in model.streams]
    tokens = np.asarray(random_tokens(model, seed=9)).copy()
    weights = np.ones(tokens.shape, np.float32)
    text_id = VOCAB.range("text").start + 3  # a valid id, but not in the "sem" stream's ranges
    ac2_id = VOCAB.range("ac2").start + 1  # not in the "a0" stream's ranges
    sem, a0 = names.index("sem"), names.index("a0")
    tokens[0, sem, [2, 4]] = text_id  # counted: weight 1
    tokens[1, sem, 3] = text_id
    weights[1, sem, 3] = 0.0  # not counted: weight 0
    tokens[1, a0, 5] = ac2_id  # counted
    tokens[0, a0, 0] = ac2_id  # not counted: step 0 is never a target
    _, weight_sum, metrics = loss_fn(model, jnp.asarray(tokens), jnp.asarray(weights))
    assert int(metrics["invalid_targets"]) == 3
    # invalid targets carry no weight (and no loss)
    per_stream = B * (T - 1)
    assert float(metrics["weight_sum/sem"]) == per_stream - 3
    assert float(metrics["weight_sum/a0"]) == per_stream - 1
    assert float(weight_sum) == len(names) * per_stream - 3 - 1
    assert all(np.isfinite(float(v)) for v in metrics.values())


# --- embeddings --------------------------------------------------------------------------

def test_stream_combine_mean_is_sum_over_k_and_absent_tokens_contribute_nothing():
    summed = model_for(depth=True, stream_combine="sum")
    mean = model_for(depth=True, stream_combine="mean")
    assert summed is model_for(depth=True)  # "sum" is the default
    assert_trees_close(params_of(summed), params_of(mean), atol=0)
    tokens = random_tokens(summed, seed=10)
    k_streams = tokens.shape[1]
    e_sum, e_mean = embed_fn(summed, tokens), embed_fn(mean, tokens)
    assert e_sum.shape == (B, T, 32)
    np.testing.assert_allclose(np.asarray(e_mean), np.asarray(e_sum) / k_streams, atol=1e-6)

    table, stream_vec = np.asarray(summed.embed.table[...]), np.asarray(summed.embed.stream[...])
    t_np = np.asarray(tokens)
    manual = sum(table[t_np[:, k]] + stream_vec[k] for k in range(k_streams))
    np.testing.assert_allclose(np.asarray(e_sum), manual, atol=1e-5)

    # a negative id means "no input": that stream's row and stream vector both drop out
    absent = tokens.at[0, 1, 2].set(-1).at[1, :, 3].set(-1)
    a_sum, a_mean = np.asarray(embed_fn(summed, absent)), np.asarray(embed_fn(mean, absent))
    expected = np.asarray(e_sum).copy()
    expected[0, 2] -= table[t_np[0, 1, 2]] + stream_vec[1]
    expected[1, 3] = 0.0
    np.testing.assert_allclose(a_sum, expected, atol=1e-5)
    np.testing.assert_allclose(a_mean, expected / k_streams, atol=1e-6)
    # the model runs on such grids (temporal logits; the depth inputs are not "absent"-aware)
    temporal, _ = forward(summed, absent)
    assert all(np.isfinite(np.asarray(x)).all() for x in temporal)


# --- causality ---------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 3, 6])
def test_temporal_logits_are_causal(t):
    model = model_for(depth=True)
    tokens = random_tokens(model, seed=11)
    changed = tokens
    for k in range(tokens.shape[1]):
        changed = perturb(model, changed, k, t)
    (t0, d0), (t1, d1) = forward(model, tokens), forward(model, changed)
    for a, b in zip(t0, t1):
        np.testing.assert_allclose(np.asarray(b[:, :t]), np.asarray(a[:, :t]), atol=1e-6, rtol=0)
        assert max_diff(b[:, t], a[:, t]) > 1e-3
    # depth position t-1 predicts frame t (and reads its tokens): only positions < t-1 are fixed
    np.testing.assert_allclose(np.asarray(d1[:, :t - 1]), np.asarray(d0[:, :t - 1]), atol=1e-6, rtol=0)
    assert max_diff(d1[:, t - 1], d0[:, t - 1]) > 1e-3


# --- mixed precision ---------------------------------------------------------------------

def test_bfloat16_compute_is_close_to_float32():
    fp32, bf16 = model_for(depth=True), model_for(depth=True, dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params_of(bf16)))
    assert_trees_close(params_of(bf16), params_of(fp32), atol=0)
    tokens = random_tokens(fp32, seed=13)
    (t32, d32), (t16, d16) = forward(fp32, tokens), forward(bf16, tokens)
    for a, b in zip([*t32, d32], [*t16, d16]):
        assert b.dtype == jnp.float32 and np.isfinite(np.asarray(b)).all()
        assert max_diff(a, b) < 0.1 * np.abs(np.asarray(a)).max()
        assert max_diff(a, b) > 0  # the bf16 path really ran in bf16

    # cached decoding with a bf16 cache follows the bf16 full-sequence logits
    h, stepped = decode_in_chunks(bf16, tokens, [T - 1, 1])
    assert h.dtype == jnp.bfloat16
    for a, b in zip(stepped, t16):
        assert max_diff(a, b) < 0.1 * np.abs(np.asarray(b)).max()


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators():
    assert ModelConfig().dtype == "auto" and ModelConfig().param_dtype == "float32"
    assert compute_dtype("auto", "cpu") == "float32"
    assert compute_dtype("auto", "gpu") == compute_dtype("auto", "tpu") == "bfloat16"
    assert compute_dtype("bfloat16", "cpu") == "bfloat16"  # a config's own choice stands
    assert model_for(dtype="auto").dtype == jnp.float32  # these tests run on CPU
    with pytest.raises(ConfigError, match="model.dtype='float33'"):
        compute_dtype("float33", "cpu")


def _primitives(jaxpr) -> list:
    """Every equation of `jaxpr` and of the jaxprs inside it (scan bodies, jitted calls)."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _primitives(inner)
    return found


def test_bfloat16_compute_keeps_softmax_and_norms_in_float32():
    model = model_for(dtype="bfloat16")
    tokens, weights = _remat_batch()
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).loss(tokens, weights))(state).jaxpr
    eqns = _primitives(jaxpr)
    dtypes = {}
    for eqn in eqns:
        dtypes.setdefault(eqn.primitive.name, set()).update(v.aval.dtype for v in eqn.outvars)
    assert jnp.dtype(jnp.bfloat16) in dtypes["dot_general"]  # the matmuls do run in bfloat16
    # softmax (attention, loss) exponentiates, RMSNorm takes rsqrt of a mean: all in float32
    for name in ("exp", "rsqrt", "reduce_max"):
        assert dtypes[name] == {jnp.dtype(jnp.float32)}, (name, dtypes[name])


def test_bfloat16_training_keeps_float32_params_grads_and_optimizer_state():
    import optax

    from slm.config import OptimConfig
    from slm.train.optim import make_optimizer

    model = model_for(dtype="bfloat16")
    params = params_of(model)
    loss, grads = _loss_and_grads(model)
    optimizer = make_optimizer(OptimConfig(), total_steps=10)
    opt_state = optimizer.init(params)
    stepped = params
    for _ in range(2):  # the first step's learning rate is warmup's 0
        updates, opt_state = optimizer.update(grads, opt_state, stepped)
        stepped = optax.apply_updates(stepped, updates)
    floats = [x for tree in (grads, opt_state, stepped) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert np.isfinite(float(loss))
    assert any(max_diff(a, b) > 0 for a, b in zip(jax.tree.leaves(stepped), jax.tree.leaves(params)))


def test_bfloat16_decode_cache_follows_compute_dtype():
    model = model_for(dtype="bfloat16")
    assert model.init_decode_state(2, CAPACITY).cache.k.dtype == jnp.bfloat16
    decode_in_chunks(model, random_tokens(model), [T])


# --- configuration errors ----------------------------------------------------------------

def _construct(cfg: ModelConfig):
    # eval_shape: run the constructor's checks without materializing parameters
    return nnx.eval_shape(lambda: SpeechLM(cfg, VOCAB, nnx.Rngs(0)))


def test_unknown_range_name_raises_config_error():
    cfg = make_cfg(streams=[StreamConfig("text", ["specials", "txet"])])
    with pytest.raises(ConfigError, match=r"'txet'") as err:
        _construct(cfg)
    assert "model.streams[0].ranges" in str(err.value)  # where, and what exists instead
    assert "specials" in str(err.value) and "units" in str(err.value)


def test_depth_streams_of_unequal_sizes_raise_config_error():
    cfg = make_cfg(depth=True)
    cfg.streams[-1] = StreamConfig("a2", ["ac2", "units"], "depth")  # 16 + 20 ids vs 16
    with pytest.raises(ConfigError, match="equal vocab sizes"):
        _construct(cfg)


@pytest.mark.parametrize("mutate, pattern", [
    (lambda c: setattr(c.depth, "cond_stream", "a0"), "cond_stream"),
    (lambda c: setattr(c.depth, "cond_stream", "nope"), "cond_stream"),
    (lambda c: setattr(c.depth, "num_layers", 0), "num_layers"),
    (lambda c: c.streams.append(StreamConfig("text", ["units"])), "unique"),
    (lambda c: setattr(c.streams[0], "head", "sideways"), "head"),
    (lambda c: setattr(c, "streams", [StreamConfig("a0", ["ac0"], "depth")]), "temporal"),
    (lambda c: setattr(c.streams[0], "ranges", ["specials", "text", "text"]), "twice"),
    (lambda c: setattr(c, "stream_combine", "max"), "stream_combine"),
    (lambda c: setattr(c, "num_kv_heads", 3), "num_kv_heads"),
], ids=["cond-depth", "cond-unknown", "no-depth-layers", "dup-name", "bad-head", "no-temporal",
        "dup-range", "bad-combine", "bad-kv-heads"])
def test_other_bad_stream_configs_raise_config_error(mutate, pattern):
    cfg = make_cfg(depth=True)
    mutate(cfg)
    with pytest.raises(ConfigError, match=pattern):
        _construct(cfg)


def test_valid_config_constructs_abstractly():
    model = _construct(make_cfg(depth=True))
    assert [s.name for s in model.streams] == ["text", "sem", "a0", "a1", "a2"]
    assert model.temporal_index == (0, 1) and model.depth_index == (2, 3, 4)


@pytest.mark.parametrize("depth", [False, True])
def test_a_packed_row_scores_each_example_as_if_alone(depth):
    """Segment ids keep packed examples apart: positions restart, attention stays inside an
    example, and no example is scored on predicting the next one's first token."""
    model = model_for(depth=depth)
    first, second = random_tokens(model, seed=1, batch=1, steps=5), random_tokens(model, seed=2, batch=1, steps=7)
    pad = jnp.zeros((1, first.shape[1], 4), jnp.int32)
    packed = jnp.concatenate([first, second, pad], axis=2)
    segments = jnp.array([[1] * 5 + [2] * 7 + [0] * 4], jnp.int32)
    weights = (segments > 0)[:, None, :].astype(jnp.float32) * jnp.ones(packed.shape)

    def loss(tokens, w, seg=None):
        return nnx.jit(lambda m, t, w, s: m.loss(t, w, s))(model, tokens, w, seg)

    total, weight, _ = loss(packed, weights, segments)
    alone = [loss(x, jnp.ones(x.shape)) for x in (first, second)]
    np.testing.assert_allclose(total, alone[0][0] + alone[1][0], rtol=1e-5)
    assert float(weight) == float(alone[0][1] + alone[1][1])
    together, _, _ = loss(packed, weights)  # without segment ids the second example sees the first
    assert abs(float(together) - float(total)) > 1e-3
