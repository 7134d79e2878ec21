"""Ahead-of-time plan of a training run: will this config fit that accelerator, on that mesh?

The model is built abstractly (shapes only), laid out on a mesh of N devices, and the real
train step is lowered and compiled for it, so the numbers come from the compiler, not from a
formula. The devices are the target's own where JAX can describe them without hardware
(TPU topologies, with libtpu installed: `pip install -e .[tpu]`), otherwise N simulated CPU
devices with the same mesh: then the per-device sizes are XLA:CPU's buffer assignment, a
close stand-in for the accelerator's, but not its exact layout.

The plan names the attention kernel the target runs (`model.attention`, see
slm.model.attention). A kernel that only compiles on the target (splash, cuDNN) is replaced
on CPU stand-ins by the CPU's own (blocked), which holds at least as much in memory: its
per-block scores are materialised, where the flash kernels keep only tiles.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from slm.config import Config, MeshConfig
from slm.errors import ConfigError, ShardingError
from slm.data.source import with_speech_input
from slm.model.attention import compilable, resolve
from slm.model.precision import compute_dtype
from slm.model.speech_input import frames_per_step
from slm.parallel.mesh import make_mesh
from slm.parallel.rules import batch_sharding
from slm.strategies import with_strategy_streams
from slm.train.optim import learning_rate, make_optimizer
from slm.train.state import plan_state
from slm.train.step import lora_dropout_key, make_train_step
from slm.train.trainer import vocab_from_config


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    hbm_bytes: float  # per chip
    peak_flops: float  # bf16 per chip
    tpu: str = ""  # libtpu's name for compile-only topologies; "" for GPUs
    dims: int = 2  # torus dimensions of a slice

    @property
    def platform(self) -> str:
        return "tpu" if self.tpu else "gpu"


TARGETS = {
    "v5p": Target("TPU v5p", 95e9, 459e12, "v5p", 3),
    "v5e": Target("TPU v5e", 16e9, 197e12, "v5e"),
    "v6e": Target("TPU v6e", 32e9, 918e12, "v6e"),
    "h100": Target("NVIDIA H100", 80e9, 989e12),
}


@dataclasses.dataclass
class Plan:
    target: Target
    devices: int
    device_kind: str  # what was compiled for: "TPU v5p" or "cpu (simulating ...)"
    mesh: dict[str, int]
    params: int
    param_bytes: int  # per device, as sharded
    optimizer_bytes: int
    batch_bytes: int
    temp_bytes: int  # activations, gradients and scratch of the compiled step
    peak_bytes: int  # arguments + outputs - donated + temp
    flops_per_step: float  # all devices, remat's recomputation included
    model_flops_per_step: float  # 6 * params * tokens, for comparison
    replicated_fraction: float
    max_replicated_fraction: float
    compile_seconds: float
    attention: str  # the kernel the target runs in the temporal decoder
    compiled_attention: str  # the kernel compiled here (differs on CPU stand-ins)
    depth_attention: str | None  # the target's kernel in the depth decoder (None: no depth)
    remat: str  # what the backward pass recomputes (model.remat)
    dtype: str  # the compute dtype the target runs (model.dtype, auto resolved)
    param_dtype: str  # parameters, gradients and optimizer state

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.target.hbm_bytes


def _shard_bytes(shapes, shardings) -> int:
    """Bytes one device holds of a tree (the largest shard, as XLA pads none here)."""
    total = 0
    for shape, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        total += math.prod(sharding.shard_shape(shape.shape)) * np.dtype(shape.dtype).itemsize
    return total


def target_named(name: str) -> Target:
    if name not in TARGETS:
        raise ConfigError(f"--target {name}: unknown accelerator; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def simulated_devices(target: Target, count: int) -> tuple[list, str]:
    """`count` devices to compile for: the target TPU's topology if libtpu can describe it,
    else CPU devices (created here, so this must run before anything starts a JAX backend)."""
    if target.tpu:
        devices = _tpu_topology(target, count)
        if devices is not None:
            return devices, target.name
    try:
        jax.config.update("jax_num_cpu_devices", count)
        jax.config.update("jax_platforms", "cpu")  # no probing for accelerators it won't use
    except RuntimeError:
        pass  # backends already started (a test, a notebook): use the CPU devices they have
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ShardingError(f"--devices {count}: this process already has {len(devices)} CPU "
                            "devices; run `slm plan` in a fresh process")
    return devices[:count], f"cpu (simulating {target.name})"


def _tpu_topology(target: Target, count: int) -> list | None:
    """Compile-only devices of a one-slice TPU topology of `count` chips, or None without libtpu
    (or for a count no slice has)."""
    from jax.experimental import topologies

    if count & (count - 1):
        return None
    shape = _torus(count, target.dims)
    try:
        topology = topologies.get_topology_desc(
            topology_name=f"{target.tpu}:{'x'.join(map(str, shape))}", platform="tpu")
    except (RuntimeError, NotImplementedError):
        return None
    return list(topology.devices)


def _torus(count: int, dims: int) -> tuple[int, ...]:
    """The most cubic `dims`-dimensional grid of `count` (a power of two) chips."""
    shape = [1] * dims
    for i in range(int(math.log2(count))):
        shape[i % dims] *= 2
    return tuple(sorted(shape))


def plan_train_step(config: Config, target_name: str = "v5p", devices: int | None = None) -> Plan:
    """Lower and compile the train step of `config` for `devices` simulated devices (None: the
    devices of this machine) and measure it against the target accelerator; sizes are per device."""
    target = target_named(target_name)
    if devices is None:
        found, device_kind = jax.devices(), jax.devices()[0].device_kind
    else:
        found, device_kind = simulated_devices(target, devices)
    return _plan(config, found, target, device_kind)


def _lower(config: Config, vocab, mesh, grad_accum: int):
    """(state plan, batch shapes, lowered train step) of `config` on `mesh`."""
    optimizer = make_optimizer(config.optim, config.train.steps)
    state = plan_state(config, vocab, mesh, optimizer)  # the replication guard raises here
    step = make_train_step(state, optimizer, learning_rate(config.optim, config.train.steps),
                           grad_accum, lora_dropout_key(config))
    d = config.data
    grid, rows = (d.batch_size, len(config.model.streams), d.seq_len), batch_sharding(mesh, 3)
    batch = {"tokens": jax.ShapeDtypeStruct(grid, jnp.int32, sharding=rows),
             "weights": jax.ShapeDtypeStruct(grid, jnp.float32, sharding=rows),
             # packed rows, as real data arrives (slm.data.pipeline)
             "segments": jax.ShapeDtypeStruct((grid[0], 1, grid[2]), jnp.int32, sharding=rows)}
    if config.model.speech_input.dim:
        frames = (d.batch_size, d.seq_len, frames_per_step(config.model.speech_input))
        batch |= {"features": jax.ShapeDtypeStruct((*frames, config.model.speech_input.dim),
                                                   jnp.float32, sharding=rows),
                  "feature_mask": jax.ShapeDtypeStruct(frames, jnp.bool_, sharding=rows)}
    return state, batch, step.lower(state.abstract_state(), batch)


def _plan(config: Config, devices: list, target: Target, device_kind: str) -> Plan:
    vocab = vocab_from_config(config)
    config = with_speech_input(with_strategy_streams(config, vocab))
    model, length = config.model, config.data.seq_len
    depth_steps = sum(s.head == "depth" for s in model.streams)
    # the target's compute dtype, compiled as such on CPU stand-ins too
    model = dataclasses.replace(model, dtype=compute_dtype(model.dtype, target.platform))
    attention = resolve(model.attention, target.platform, model.dtype, length)
    platform = devices[0].platform
    config = dataclasses.replace(config, model=dataclasses.replace(
        model, attention=compilable(model.attention, platform, model.dtype, length)))
    # compile-only TPU devices carry no slice index; the topologies made here are one slice
    mesh = make_mesh(config.mesh, devices, one_slice=not hasattr(devices[0], "slice_index"))
    state, batch, lowered = _lower(config, vocab, mesh, config.data.grad_accum)
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    # XLA's cost analysis counts a loop body once, so FLOPs are counted on the same step with
    # its layers unrolled and one microbatch, unpartitioned (on one CPU device: any backend can)
    unrolled = dataclasses.replace(config, model=dataclasses.replace(
        config.model, scan_layers=False,
        attention=compilable(config.model.attention, "cpu", model.dtype, length)))
    one = make_mesh(MeshConfig(ici={"data": 1, "fsdp": 1, "tensor": 1}), jax.devices("cpu")[:1])
    flops = _lower(unrolled, vocab, one, 1)[2].cost_analysis()["flops"]
    d = config.data
    params = sum(math.prod(s.shape) for s in jax.tree.leaves(state.param_shapes))
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return Plan(
        target=target, devices=len(devices), device_kind=device_kind,
        mesh=dict(mesh.shape), params=params,
        param_bytes=_shard_bytes(state.param_shapes, state.param_shardings),
        optimizer_bytes=_shard_bytes(state.state_shapes.opt_state, state.state_shardings.opt_state),
        batch_bytes=_shard_bytes(batch, {k: v.sharding for k, v in batch.items()}),
        temp_bytes=memory.temp_size_in_bytes, peak_bytes=peak,
        flops_per_step=float(flops),
        model_flops_per_step=6.0 * params * d.batch_size * d.seq_len,
        replicated_fraction=state.replicated_fraction,
        max_replicated_fraction=config.mesh.max_replicated_fraction,
        compile_seconds=seconds,
        attention=attention,
        compiled_attention=resolve(config.model.attention, platform, model.dtype, length),
        depth_attention=(resolve(model.attention, target.platform, model.dtype, depth_steps)
                         if depth_steps else None),
        remat=model.remat, dtype=model.dtype, param_dtype=model.param_dtype,
    )


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def format_plan(p: Plan) -> str:
    hbm = p.target.hbm_bytes
    seconds = p.flops_per_step / (p.devices * p.target.peak_flops)
    lines = [
        f"target        {p.devices} x {p.target.name} ({_gb(hbm)} each), compiled for {p.device_kind}",
        f"mesh          {', '.join(f'{k}={v}' for k, v in p.mesh.items())}",
        f"parameters    {p.params:,} ({p.params / 1e9:.2f} B)" if p.params >= 1e8 else
        f"parameters    {p.params:,}",
        "per device:",
        f"  params      {_gb(p.param_bytes)}",
        f"  optimizer   {_gb(p.optimizer_bytes)}",
        f"  batch       {_gb(p.batch_bytes)}",
        f"  activations {_gb(p.temp_bytes)}  (compiled temp: activations, gradients, scratch)",
        f"  total       {_gb(p.peak_bytes)} of {_gb(hbm)} ({p.peak_bytes / hbm:.1%}): "
        + ("fits" if p.fits else "DOES NOT FIT"),
        f"FLOPs/step    {p.flops_per_step:.3e} in the step (remat included), "
        f"{p.model_flops_per_step:.3e} as 6*N*tokens; "
        f">= {seconds * 1e3:.3g} ms/step at peak {p.target.peak_flops / 1e12:.0f} TFLOP/s per chip",
        f"kernels       {_kernels(p)}",
        f"precision     {p.dtype} compute, {p.param_dtype} parameters, gradients and optimizer "
        "state; float32 norms and softmax",
        f"replicated    {p.replicated_fraction:.2%} of parameter bytes "
        f"(limit {p.max_replicated_fraction:.0%}): ok",
        f"compile       {p.compile_seconds:.1f} s",
    ]
    return "\n".join(lines)


def _kernels(p: Plan) -> str:
    """The attention kernels the target runs and the remat policy, e.g. `attention splash (CPU
    devices compile blocked in its place), depth decoder dot_product; remat full`."""
    text = f"attention {p.attention}"
    if p.compiled_attention != p.attention:  # only CPU stand-ins compile another kernel
        text += f" (CPU devices compile {p.compiled_attention} in its place)"
    if p.depth_attention is not None:
        text += f", depth decoder {p.depth_attention}"
    return f"{text}; remat {p.remat}"
