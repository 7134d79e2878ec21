"""Multi-controller runs: join the job the environment describes, and find each host's rows.

Every host runs the same `slm train`; JAX's distributed runtime connects them before any
backend starts. Where the job comes from is read from the environment, first match wins:

  SLM_COORDINATOR=host:port, SLM_NUM_PROCESSES, SLM_PROCESS_ID   explicit (launch/local_multiprocess.sh)
  SLURM_* of an `srun` step with more than one task               SLURM (launch/slurm_gpu.sbatch)
  SLM_DISTRIBUTED=auto                                            JAX detects the cluster (TPU VM
                                                                  slices: launch/tpu_pod.sh)
  SLM_DISTRIBUTED=off, or none of the above                       one process

On CPU, cross-process collectives need gloo, which is chosen when JAX_PLATFORMS is `cpu`.
"""

from __future__ import annotations

import os

import jax

from slm.errors import ConfigError, ShardingError

_SLURM_TASKS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _int_env(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: SLM_COORDINATOR is set, so "
                          f"{name} must be set to an integer too") from None


def job_from_env() -> dict | None:
    """`jax.distributed.initialize` arguments for this environment, or None for one process."""
    mode = os.environ.get("SLM_DISTRIBUTED", "")
    if mode not in ("", "auto", "off"):
        raise ConfigError(f"environment variable SLM_DISTRIBUTED={mode!r}: use 'auto', 'off' or "
                          "leave it unset")
    if mode == "off":
        return None
    if os.environ.get("SLM_COORDINATOR"):
        count, index = _int_env("SLM_NUM_PROCESSES"), _int_env("SLM_PROCESS_ID")
        if not 0 <= index < count:
            raise ConfigError(f"SLM_PROCESS_ID={index} must be in [0, SLM_NUM_PROCESSES={count})")
        return {"coordinator_address": os.environ["SLM_COORDINATOR"], "num_processes": count,
                "process_id": index}
    if all(name in os.environ for name in _SLURM_TASKS) and int(os.environ["SLURM_NTASKS"]) > 1:
        return {"cluster_detection_method": "slurm"}
    if mode == "auto":
        return {}
    return None


def initialize_from_env() -> bool:
    """Join the multi-controller job if there is one; returns whether it did.

    Must run before anything touches a JAX backend: the device list of every process is the
    union over all hosts only if the runtime is up when the backends start.
    """
    job = job_from_env()
    if job is None:
        return False
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**job)
    return True


def host_batch_shard(sharding: jax.sharding.Sharding, batch_size: int) -> tuple[int, int]:
    """(index, count): this process feeds rows `[index * B/count, (index + 1) * B/count)` of
    every global batch of `batch_size` rows laid out by `sharding` (batch-major).

    Derived from the devices this process addresses, so it holds for any mesh, and hosts that
    hold the same rows (a mesh axis across hosts that does not split the batch) read the same
    data. One process: (0, 1).
    """
    shape = (batch_size,) + (1,) * (len(sharding.spec) - 1)
    try:
        indices = sharding.addressable_devices_indices_map(shape).values()
    except ValueError as err:
        raise ShardingError(f"data.batch_size={batch_size} does not split over the mesh's batch "
                            f"axes ({err}); make it a multiple of mesh data x fsdp") from None
    rows = sorted({index[0].indices(batch_size)[:2] for index in indices})
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    size = stop - start
    if covered != size or batch_size % size or start % size:
        raise ShardingError(
            f"process {jax.process_index()} would hold batch rows {rows}, not one block of a "
            "whole fraction of data.batch_size; put the axes that cross hosts first "
            "(mesh.dcn) or make the batch axes span whole hosts"
        )
    return start // size, batch_size // size
