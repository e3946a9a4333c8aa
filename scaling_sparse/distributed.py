"""Several processes, one run: JAX's own multi-controller runtime (no layer of our own).

`initialize` calls `jax.distributed.initialize` before any device is touched: with the three
flags (--coordinator_address, --num_processes, --process_id) as given, or with none of them under
SLURM (several tasks) or on a multi-host TPU VM slice, where JAX detects the cluster itself. After
it, `jax.devices()` lists every process's devices and one mesh spans them (sharding.py).

Who writes what: every process computes and takes part in orbax's checkpoint saves; only the
primary process (index 0) writes metrics.jsonl, TensorBoard events, config.json and the console.
"""

from __future__ import annotations

import os

import jax

from scaling_sparse.config import ConfigError


def _cluster_detected() -> bool:
    """True under a scheduler or slice JAX's auto-detection handles (SLURM with several tasks,
    a multi-host Cloud TPU slice)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts the multi-process runtime when asked or detected; returns True if it did."""
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise ConfigError("multi-process runs need all three of --coordinator_address=HOST:PORT, "
                              "--num_processes=N and --process_id=I (or none of them under SLURM / on a TPU VM)")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id={process_id} must be in 0..{num_processes - 1} (--num_processes)")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if _cluster_detected():
        jax.distributed.initialize()
        return True
    return False


def is_primary() -> bool:
    """Process 0 writes the run's files and the console output."""
    return jax.process_index() == 0
