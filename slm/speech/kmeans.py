"""K-means in JAX: k-means++ seeding on a subsample, then mini-batch updates (Sculley, 2010).

Speech tokenizers cluster millions of frames into a few hundred units, so both phases run as
single jitted programs: seeding is a `fori_loop` over the k centers, training a `scan` over
mini-batches, and no Python code ever touches an individual point. Everything is driven by one
`jax.random.key(seed)`, so the same data and seed give the same codebook bit for bit.

Mini-batch update: every center keeps the number of points it has absorbed and moves towards each
new point with learning rate 1/count, which makes it the running mean of its points. A batch's
points can therefore be folded in at once: c <- (count * c + sum of new points) / (count + n).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from slm import atomic
from slm.errors import CheckpointError, DataError

ASSIGN_CHUNK = 8192  # rows per jitted assignment call: bounds the [chunk, k] distance matrix


@dataclass(frozen=True)
class Centroids:
    """A trained codebook: `centers_kd[i]` is the center of unit i."""

    centers_kd: np.ndarray

    def __post_init__(self) -> None:
        centers = np.asarray(self.centers_kd, dtype=np.float32)
        if centers.ndim != 2 or centers.shape[0] == 0:
            raise DataError(f"centroids must be a non-empty [k, dim] array, got shape {centers.shape}")
        object.__setattr__(self, "centers_kd", centers)

    @property
    def k(self) -> int:
        return self.centers_kd.shape[0]

    @property
    def dim(self) -> int:
        return self.centers_kd.shape[1]

    def assign(self, x_nd: np.ndarray) -> np.ndarray:
        """int32 `[N]`: index of the nearest center (squared Euclidean) for every row."""
        return nearest(x_nd, self.centers_kd)[0]

    def inertia(self, x_nd: np.ndarray) -> float:
        """Sum over rows of the squared distance to the nearest center (lower is better)."""
        return float(np.sum(nearest(x_nd, self.centers_kd)[1], dtype=np.float64))

    def save(self, path: str | Path) -> None:
        """npz holding only `centers_kd`, written under a temporary name then renamed."""
        atomic.write_npz(path, centers_kd=self.centers_kd)

    @classmethod
    def load(cls, path: str | Path) -> Centroids:
        try:
            with np.load(Path(path), allow_pickle=False) as npz:
                return cls(npz["centers_kd"])
        except (OSError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: not a saved centroids file ({err})") from err


def fit_kmeans(x_nd: np.ndarray, k: int, *, seed: int = 0, batch_size: int = 1024,
               steps: int = 200, init_sample: int = 10000) -> Centroids:
    """Cluster the rows of `x_nd` into k centers; deterministic for a given seed."""
    x_nd = jnp.asarray(_check_points(x_nd, k))
    sample_key, init_key, train_key = jax.random.split(jax.random.key(seed), 3)
    sample_sd = _subsample(x_nd, init_sample, sample_key)
    centers_kd = _kmeans_plus_plus(sample_sd, init_key, k)
    centers_kd = _minibatch_train(x_nd, centers_kd, train_key, batch_size, steps)
    return Centroids(revive_dead_centers(np.asarray(centers_kd), np.asarray(sample_sd)))


def revive_dead_centers(centers_kd: np.ndarray, x_nd: np.ndarray) -> np.ndarray:
    """Move centers that no row of `x_nd` picks onto the rows farthest from their centers.

    A dead center is a code the tokenizer can never emit, i.e. wasted vocabulary; the farthest
    points are the worst-served data, so giving them their own center lowers the error most.
    """
    idx_n, d2_n = nearest(x_nd, centers_kd)
    dead = np.flatnonzero(np.bincount(idx_n, minlength=len(centers_kd)) == 0)
    if dead.size == 0:
        return centers_kd
    farthest = np.argsort(-d2_n, kind="stable")[:dead.size]
    revived = centers_kd.copy()
    revived[dead[:farthest.size]] = x_nd[farthest]
    return revived


def nearest(x_nd: np.ndarray, centers_kd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 index `[N]`, float32 squared distance `[N]`) of each row's nearest center.

    Rows go through the jitted kernel in fixed-size chunks, so memory stays at `[chunk, k]`.
    Short inputs use the next power of two instead, which keeps the number of compiled shapes
    small while a 1-second utterance is not padded to thousands of rows.
    """
    x_nd = np.asarray(x_nd, dtype=np.float32)
    if x_nd.ndim != 2 or x_nd.shape[1] != centers_kd.shape[1]:
        raise DataError(f"points of shape {x_nd.shape} do not match centers of dim {centers_kd.shape[1]}")
    n = x_nd.shape[0]
    rows = min(ASSIGN_CHUNK, 1 << max(n - 1, 0).bit_length())
    centers = jnp.asarray(centers_kd)
    parts = [_nearest_kernel(_pad_rows(x_nd[s:s + rows], rows), centers) for s in range(0, n, rows)]
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    idx_n = np.concatenate([np.asarray(idx) for idx, _ in parts])[:n]
    d2_n = np.concatenate([np.asarray(d2) for _, d2 in parts])[:n]
    return idx_n, d2_n


@jax.jit
def _nearest_kernel(x_nd: jax.Array, centers_kd: jax.Array) -> tuple[jax.Array, jax.Array]:
    d2_nk = _squared_distances(x_nd, centers_kd)
    idx_n = jnp.argmin(d2_nk, axis=1)
    return idx_n.astype(jnp.int32), jnp.take_along_axis(d2_nk, idx_n[:, None], axis=1)[:, 0]


def _squared_distances(x_nd: jax.Array, centers_kd: jax.Array) -> jax.Array:
    """|x|^2 - 2 x.c + |c|^2 as one matmul; clipped at 0 against rounding."""
    x_sq_n1 = jnp.sum(x_nd * x_nd, axis=1, keepdims=True)
    c_sq_k = jnp.sum(centers_kd * centers_kd, axis=1)
    return jnp.maximum(x_sq_n1 - 2.0 * x_nd @ centers_kd.T + c_sq_k[None, :], 0.0)


def _pad_rows(x_nd: np.ndarray, rows: int) -> np.ndarray:
    return np.pad(x_nd, ((0, rows - x_nd.shape[0]), (0, 0)))


def _subsample(x_nd: jax.Array, size: int, key: jax.Array) -> jax.Array:
    """Up to `size` distinct rows: k-means++ is O(k * size), so it never sees the whole corpus."""
    if x_nd.shape[0] <= size:
        return x_nd
    return x_nd[jax.random.choice(key, x_nd.shape[0], (size,), replace=False)]


@partial(jax.jit, static_argnames="k")
def _kmeans_plus_plus(x_sd: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """Greedy k-means++ (Arthur & Vassilvitskii, 2007): seeds drawn with probability ~ D(x)^2.

    Spreading the seeds over the data is what keeps codebooks from collapsing onto a few dense
    regions (e.g. silence frames). Each step draws 2 + ln(k) candidates and keeps the one that
    lowers the total D^2 most, as scikit-learn does: plain k-means++ still puts two seeds in one
    cluster often enough that mini-batch updates, which never move a center far, cannot recover.
    """
    trials = 2 + int(np.log(k))
    keys = jax.random.split(key, k)
    first = x_sd[jax.random.randint(keys[0], (), 0, x_sd.shape[0])]
    centers_kd = jnp.zeros((k, x_sd.shape[1]), x_sd.dtype).at[0].set(first)
    d2_s = jnp.sum(jnp.square(x_sd - first), axis=1)

    def add_center(i: int, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        centers_kd, d2_s = carry
        logits_s = jnp.where(jnp.sum(d2_s) > 0, jnp.log(d2_s), 0.0)
        candidates_ld = x_sd[jax.random.categorical(keys[i], logits_s, shape=(trials,))]
        d2_ls = jnp.minimum(d2_s[None, :], _squared_distances(candidates_ld, x_sd))
        best = jnp.argmin(jnp.sum(d2_ls, axis=1))
        return centers_kd.at[i].set(candidates_ld[best]), d2_ls[best]

    return jax.lax.fori_loop(1, k, add_center, (centers_kd, d2_s))[0]


@partial(jax.jit, static_argnames=("batch_size", "steps"))
def _minibatch_train(x_nd: jax.Array, centers_kd: jax.Array, key: jax.Array,
                     batch_size: int, steps: int) -> jax.Array:
    """`steps` mini-batches drawn with replacement; each center is the running mean of its points."""
    k = centers_kd.shape[0]

    def step(carry: tuple[jax.Array, jax.Array], step_key: jax.Array):
        centers_kd, counts_k = carry
        batch_bd = x_nd[jax.random.randint(step_key, (batch_size,), 0, x_nd.shape[0])]
        idx_b, _ = _nearest_kernel(batch_bd, centers_kd)
        sums_kd = jax.ops.segment_sum(batch_bd, idx_b, num_segments=k)
        hits_k = jax.ops.segment_sum(jnp.ones(batch_size, x_nd.dtype), idx_b, num_segments=k)
        counts_k = counts_k + hits_k
        step_kd = (sums_kd - hits_k[:, None] * centers_kd) / jnp.maximum(counts_k, 1.0)[:, None]
        return (centers_kd + step_kd, counts_k), None

    init = (centers_kd, jnp.zeros(k, x_nd.dtype))
    return jax.lax.scan(step, init, jax.random.split(key, steps))[0][0]


def _check_points(x_nd: np.ndarray, k: int) -> np.ndarray:
    x_nd = np.asarray(x_nd, dtype=np.float32)
    if x_nd.ndim != 2:
        raise DataError(f"k-means needs a [N, dim] array of points, got shape {x_nd.shape}")
    if k < 1 or x_nd.shape[0] < k:
        raise DataError(f"k-means with k={k} needs at least k points, got {x_nd.shape[0]}; "
                        f"use more audio or fewer units")
    if not np.all(np.isfinite(x_nd)):
        raise DataError("k-means input holds NaN or inf; check the features that produced it")
    return x_nd
