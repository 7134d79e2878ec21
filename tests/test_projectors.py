"""Speech projectors: rates, masks, numpy references, training, jit and sharding on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from slm.errors import ConfigError, DataError
from slm.model.projectors import PROJECTORS, build_projector
from slm.parallel.rules import batch_sharding, replicated_report, tree_shardings

nnx.use_eager_sharding(False)  # params carry logical axis names; meshes are built per test

ENC, D = 16, 32
TINY = {  # name -> options of a small instance, each downsampling a different way
    "stack_mlp": {"k": 2, "hidden": 32},
    "conv_mlp": {"frames_per_output": 4, "stride": 2, "kernel": 3, "hidden": 32},
    "qformer": {"window": 4, "queries": 2, "layers": 1, "hidden": 32, "heads": 4},
}


def _make(name, options=None, enc_dim=ENC, d_model=D, seed=0):
    return build_projector(name, enc_dim, d_model, TINY[name] if options is None else options,
                           nnx.Rngs(seed))


# tests run projectors jitted: op by op, a Q-Former forward takes seconds on a busy CPU
_forward = nnx.jit(lambda projector, x, mask: projector(x, mask))


def _inputs(lengths, frames, seed=0):
    x = jax.random.normal(jax.random.key(seed), (len(lengths), frames, ENC))
    return x, jnp.arange(frames)[None, :] < jnp.array(lengths)[:, None]


def test_all_tiny_projectors_are_registered():
    assert set(TINY) <= set(PROJECTORS)


@pytest.mark.parametrize("name, options, rate, length", [
    ("stack_mlp", {"k": 5, "hidden": 2048}, 10.0, 21),  # LLaMA-Omni: 50 Hz -> 10 Hz
    ("conv_mlp", {"frames_per_output": 2}, 25.0, 52),  # Qwen-Audio's stride-2 pooling
    ("conv_mlp", {"frames_per_output": 8, "stride": 2}, 6.25, 13),
    ("qformer", {}, 50 / 17, 7),  # SALMONN: one query per 17 frames
    ("qformer", {"window": 10, "queries": 2}, 10.0, 22),
])
def test_rates_and_lengths(name, options, rate, length):
    projector = nnx.eval_shape(lambda: build_projector(name, 1280, 4096, options, nnx.Rngs(0)))
    assert projector.output_rate(50.0) == pytest.approx(rate)
    assert projector.output_length(103) == length
    assert f": 50.0 Hz -> {rate:.1f} Hz, " in projector.describe(50.0)


def test_describe_counts_parameters():
    # LLaMA-Omni's projector: Linear(1280*5 -> 2048) + Linear(2048 -> 4096), with biases
    projector = nnx.eval_shape(lambda: build_projector(
        "stack_mlp", 1280, 4096, {"k": 5, "hidden": 2048}, nnx.Rngs(0)))
    assert 1280 * 5 * 2048 + 2048 + 2048 * 4096 + 4096 == 21_501_952
    assert projector.describe(50.0) == "stack_mlp k=5: 50.0 Hz -> 10.0 Hz, 21.5M params"
    tiny = _make("conv_mlp")  # two convs (3 taps, 16->32, 32->32) and 32->32->32
    assert (3 * 16 * 32 + 32) + (3 * 32 * 32 + 32) + 2 * (32 * 32 + 32) == 6784
    assert tiny.describe(100.0) == ("conv_mlp frames_per_output=4 stride=2 kernel=3: "
                                    "100.0 Hz -> 25.0 Hz, 6.8K params")


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("frames", [13, 1])
def test_shapes(name, frames):
    projector = _make(name)
    y, mask = _forward(projector, *_inputs([frames, frames], frames))
    outputs = projector.output_length(frames)
    assert y.shape == (2, outputs, D) and mask.shape == (2, outputs) and mask.dtype == jnp.bool_


@pytest.mark.parametrize("name", TINY)
def test_output_valid_if_any_frame_of_its_window_is(name):
    projector = _make(name)
    lengths = [13, 5, 1, 0]
    x, mask = _inputs(lengths, 13)
    y, out_mask = _forward(projector, x, mask)
    window, per = projector.window, projector.per_window
    expected = np.arange(out_mask.shape[1])[None, :] // per < -(-np.array(lengths)[:, None] // window)
    np.testing.assert_array_equal(out_mask, expected)
    assert np.all(np.asarray(y)[~expected] == 0)
    assert np.all(np.abs(np.asarray(y)[expected]) > 0)


@pytest.mark.parametrize("name", TINY)
def test_padding_frames_never_reach_the_output(name):
    projector = _make(name)
    x, mask = _inputs([13, 6], 13)
    y, _ = _forward(projector, x, mask)
    noisy = jnp.where(mask[..., None], x, 1e3 * jax.random.normal(jax.random.key(7), x.shape))
    np.testing.assert_allclose(_forward(projector, noisy, mask)[0], y, atol=1e-5)
    # a partial last window is padded with invalid zero frames, not dropped
    longer = jnp.pad(x, ((0, 0), (0, 3), (0, 0)))
    y_longer, _ = _forward(projector, longer, jnp.pad(mask, ((0, 0), (0, 3))))
    np.testing.assert_allclose(y_longer[:, : y.shape[1]], y, atol=1e-5)


def _linear(x, projector_w, projector_b):
    return x @ np.asarray(projector_w[...]) + np.asarray(projector_b[...])


def test_stacking_matches_numpy_reshape_and_matmul():
    projector = _make("stack_mlp", {"k": 3, "hidden": 24})
    x, mask = _inputs([10, 7], 10)
    xn = np.asarray(x) * np.asarray(mask)[..., None]
    xn = np.concatenate([xn, np.zeros((2, 2, ENC))], axis=1)  # 10 frames -> 12, whole windows
    stacked = np.stack([np.concatenate([xn[:, 3 * t + j] for j in range(3)], axis=-1)
                        for t in range(4)], axis=1)
    hidden = np.maximum(_linear(stacked, projector.w_in, projector.b_in), 0)
    ref = _linear(hidden, projector.w_out, projector.b_out)
    ref *= (np.arange(4)[None, :] < np.array([[4], [3]]))[..., None]
    np.testing.assert_allclose(_forward(projector, x, mask)[0], ref, rtol=1e-5, atol=1e-5)


def _numpy_conv(x_bfc, w_kio, b_o, stride, kernel):
    left = (kernel - stride) // 2
    padded = np.pad(x_bfc, ((0, 0), (left, kernel - stride - left), (0, 0)))
    out = [sum(padded[:, t * stride + j] @ w_kio[j] for j in range(kernel))
           for t in range(x_bfc.shape[1] // stride)]
    return np.stack(out, axis=1) + b_o


@pytest.mark.parametrize("stride, kernel, frames_per_output", [(2, 3, 4), (2, 4, 2), (3, 3, 3)])
def test_conv_matches_numpy_reference_conv(stride, kernel, frames_per_output):
    options = {"frames_per_output": frames_per_output, "stride": stride, "kernel": kernel,
               "hidden": 24, "activation": "relu"}
    projector = _make("conv_mlp", options)
    lengths = np.array([17, 9])
    x, mask = _inputs(lengths, 17)
    frames = -(-17 // frames_per_output) * frames_per_output
    h = np.zeros((2, frames, ENC))
    h[:, :17] = np.asarray(x) * np.asarray(mask)[..., None]
    valid = np.arange(frames)[None, :] < lengths[:, None]
    for conv in projector.convs:
        h = np.maximum(_numpy_conv(h, np.asarray(conv.w_kio[...]), np.asarray(conv.b_o[...]),
                                   stride, kernel), 0)
        valid = valid.reshape(2, -1, stride).any(-1)
        h *= valid[..., None]
    hidden = np.maximum(_linear(h, projector.w_in, projector.b_in), 0)
    ref = _linear(hidden, projector.w_out, projector.b_out) * valid[..., None]
    np.testing.assert_allclose(_forward(projector, x, mask)[0], ref, rtol=1e-5, atol=1e-5)


def test_qformer_outputs_see_only_their_window():
    projector = _make("qformer")  # window 4, 2 queries per window
    x, mask = _inputs([12], 12)
    y, _ = _forward(projector, x, mask)
    y_changed, _ = _forward(projector, x.at[:, 4:8].add(1.0), mask)  # the second window's frames
    np.testing.assert_allclose(y_changed[:, [0, 1, 4, 5]], y[:, [0, 1, 4, 5]], atol=1e-6)
    assert not np.allclose(y_changed[:, 2:4], y[:, 2:4])


@pytest.mark.parametrize("name", TINY)
def test_gradients_train_every_parameter(name):
    """A few optax steps on a tiny regression task: the loss falls by more than half."""
    graphdef, params = nnx.split(_make(name))
    x, mask = _inputs([16, 11, 7, 16], 16)
    out = _make(name).output_length(16)
    target = jax.random.normal(jax.random.key(3), (4, out, D))

    def loss_fn(p):
        y, out_mask = nnx.merge(graphdef, p)(x, mask)
        return jnp.sum(((y - target) ** 2) * out_mask[..., None]) / (out_mask.sum() * D)

    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(p, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss, grads

    opt_state = optimizer.init(params)
    params, opt_state, first, grads = step(params, opt_state)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    for _ in range(40):
        params, opt_state, loss, _ = step(params, opt_state)
    assert float(loss) < 0.5 * float(first), (float(first), float(loss))


@pytest.mark.parametrize("name", TINY)
def test_jit_matches_eager(name):
    projector = _make(name)
    x, mask = _inputs([11, 4], 11)
    eager = projector(x, mask)
    jitted = _forward(projector, x, mask)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jitted[1], eager[1])


@pytest.mark.parametrize("name", TINY)
def test_sharded_on_8_devices_matches_one(name):
    """Created shard by shard on a fsdp=4 x tensor=2 mesh: weights split 8 ways, same outputs."""
    assert len(jax.devices()) >= 8
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 3)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _make(name)))
    shapes = nnx.to_pure_dict(state)
    shardings = tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(state)), shapes, mesh)
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(_make(name))), out_shardings=shardings)()

    w_in = params["layers"][0]["w_up"] if name == "qformer" else params["w_in"]
    assert w_in.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert {s.data.shape for s in w_in.addressable_shards} == {(32 // 4, w_in.shape[1] // 2)}
    for path, sharding in jax.tree_util.tree_leaves_with_path(shardings):
        path = jax.tree_util.keystr(path)
        assert ("norm" in path) == (sharding.spec == PartitionSpec(None)), (path, sharding.spec)
    fraction, _ = replicated_report(shapes, shardings, mesh)
    assert fraction < 0.01  # only the Q-Former's norm scales stay whole

    x, mask = _inputs([16, 9, 16, 3, 12, 16, 1, 8], 16)
    forward = jax.jit(lambda p, x, m: nnx.merge(graphdef, p)(x, m))
    with jax.set_mesh(mesh):
        y, out_mask = forward(params, jax.device_put(x, batch_sharding(mesh, 3)),
                              jax.device_put(mask, batch_sharding(mesh, 2)))
    assert isinstance(y.sharding, NamedSharding)
    y_one, mask_one = _forward(_make(name), x, mask)
    np.testing.assert_allclose(y, y_one, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out_mask, mask_one)


@pytest.mark.parametrize("name, options, message", [
    ("stack_mlp", {"k": 0}, "projector.k=0: must be a positive"),
    ("stack_mlp", {"k": -5}, "projector.k=-5"),
    ("stack_mlp", {"stride": 2}, "unknown config key 'projector.stride'; valid keys under "
                                 "'projector' are: activation, hidden, k (the options of "
                                 "projector 'stack_mlp'"),
    ("stack_mlp", {"k": "5"}, "projector.k: expected int, got '5'"),
    ("stack_mlp", {"k": True}, "projector.k: expected int, got True"),
    ("stack_mlp", {"activation": "tanh"}, "projector.activation='tanh'; choose one of"),
    ("conv_mlp", {"frames_per_output": 6}, "projector.frames_per_output=6 is not a power of "
                                           "projector.stride=2: set it to one of 2, 4, 8"),
    ("conv_mlp", {"frames_per_output": 1}, "projector.frames_per_output=1 is not a power"),
    ("conv_mlp", {"stride": 1, "frames_per_output": 1}, "projector.stride=1"),
    ("conv_mlp", {"stride": 3, "frames_per_output": 3, "kernel": 2}, "set kernel >= 3"),
    ("qformer", {"hidden": 30, "heads": 4}, "projector.hidden=30 is not a multiple of "
                                            "projector.heads=4"),
    ("qformer", {"window": 0}, "projector.window=0"),
    ("perceiver", {}, "projector='perceiver'; choose one of conv_mlp, qformer, stack_mlp "
                      "(a new projector registers with slm.model.projectors.register_projector"),
])
def test_bad_options_name_the_field(name, options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_projector(name, ENC, D, options, nnx.Rngs(0))


@pytest.mark.parametrize("name", TINY)
def test_bad_inputs_name_the_fix(name):
    projector = _make(name)
    x, mask = _inputs([8], 8)
    with pytest.raises(DataError, match=r"features of shape \(1, 8, 80\), expected "
                                        r"\[batch, frames, 16\] \(enc_dim"):
        projector(jnp.zeros((1, 8, 80)), mask)
    with pytest.raises(DataError, match="frame mask of shape"):
        projector(x, mask[:, :5])
