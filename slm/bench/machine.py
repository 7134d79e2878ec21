"""What this machine can do, measured in the benchmark's own process.

MFU and the decode roofline are fractions of these numbers, so they are measured in the same
run, with the same library and threads as the work they judge, rather than taken from a
datasheet: a shared or throttled machine then lowers both sides of the fraction alike.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Dense bfloat16 matmul peaks from the vendors' datasheets, by a name in `device_kind`: the
# denominator a chip's owner quotes MFU against, reported beside the measured peak.
VENDOR_BF16_PEAKS = {"H100": 989e12, "H200": 989e12}


def vendor_peak_flops(device_kind: str) -> float | None:
    """The datasheet's dense bfloat16 FLOP/s of the chip `device_kind` names, if known."""
    return next((p for chip, p in VENDOR_BF16_PEAKS.items() if chip in device_kind), None)


def seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of `fn`, waiting for whatever device work it returns."""
    begin = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - begin


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls: other processes only ever add time."""
    return min(seconds(fn) for _ in range(repeats))


def sustained_rate(fn: Callable[[], object], work: float, window: float) -> float:
    """`work` per call of `fn` over calls run back to back for about `window` seconds.

    Rates are sustained over windows as long as the steps they are compared with: on a shared
    machine a 40 ms matmul can catch a moment when both cores are free that a 2 s train step
    never gets, and a peak measured that way would understate every MFU.
    """
    calls, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < window:
        jax.block_until_ready(fn())
        calls += 1
    return work * calls / (time.perf_counter() - begin)


def matmul_peak(dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048),
                window: float = 1.0) -> float:
    """FLOP/s of the fastest square matmul among `sizes`, in `dtype`, as jitted JAX runs it."""
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(n), (n, n), jnp.dtype(dtype))
        matmul = jax.jit(lambda x: x @ x)
        jax.block_until_ready(matmul(a))
        best = max(best, sustained_rate(lambda: matmul(a), 2 * n**3, window))
    return best


def matmul_peaks(dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048),
                 window: float = 1.0) -> dict[str, float]:
    """The fastest sustained square matmul of each library that can run `dtype` here: JAX,
    torch (when installed) and numpy (float32 only).

    The machine's peak is the best of them, not JAX's own: on an Intel Xeon with AMX, torch's
    oneDNN matmul beats XLA:CPU's, and an MFU against JAX's rate alone would flatter a step
    that XLA runs slowly."""
    peaks = {"jax": matmul_peak(dtype, sizes, window)}
    torch_rate = _torch_matmul(dtype, sizes, window)
    if torch_rate is not None:
        peaks["torch"] = torch_rate
    if dtype == "float32":
        rng = np.random.default_rng(0)
        peaks["numpy"] = max(sustained_rate(lambda a=rng.standard_normal((n, n), np.float32): a @ a,
                                            2 * n**3, window) for n in sizes)
    return peaks


def _torch_matmul(dtype: str, sizes: tuple[int, ...], window: float) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    best = 0.0
    with torch.inference_mode():
        for n in sizes:
            a = torch.randn(n, n, dtype=getattr(torch, dtype))
            a @ a
            best = max(best, sustained_rate(lambda a=a: a @ a, 2 * n**3, window))
    return best


def memory_bandwidth(megabytes: int = 512, window: float = 1.0) -> float:
    """Bytes/s a matrix-vector product streams from a matrix far larger than the caches: what a
    decode step does with every weight.

    A plain `jnp.sum` over the same buffer is no steadier a limit: on the 2-core machine the
    benchmarks were calibrated on it ran at 35-37 GB/s on most calls and 58-65 GB/s on a few,
    from one call to the next, while the matrix-vector product held 44-46 GB/s throughout."""
    rows = megabytes * 2**20 // (4 * 4096)
    w = jnp.ones((rows, 4096), jnp.float32)
    v = jnp.ones((4096,), jnp.float32)
    matvec = jax.jit(lambda w: w @ v)
    jax.block_until_ready(matvec(w))
    return sustained_rate(lambda: matvec(w), w.nbytes, window)


def _cpu() -> tuple[str, str | None]:
    """CPU model name and the widest vector ISA it reports."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    isa = next((x for x in ("avx512f", "avx2", "avx", "neon", "asimd") if x in flags), None)
    return fields.get("model name") or platform.processor() or platform.machine(), isa


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """Where the numbers came from: CPU, cores, how busy they were with other processes,
    accelerator and library versions."""
    device = jax.devices()[0]
    versions = {p: _version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers")}
    cpu, isa = _cpu()
    return {
        "cpu": cpu, "isa": isa,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],  # other processes' share of the cores
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "python": platform.python_version(),
        "versions": {k: v for k, v in versions.items() if v},
    }
