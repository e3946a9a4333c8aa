"""Several processes, one run: JAX's own multi-controller runtime (no layer of our own).

`initialize` calls `jax.distributed.initialize` before any device is touched: with the three
flags (--coordinator_address, --num_processes, --process_id) as given, or with none of them under
SLURM (several tasks) or on a multi-host TPU VM slice, where JAX detects the cluster itself. After
it, `jax.devices()` lists every process's devices and one mesh spans them (sharding.py).

Who writes what: every process computes and takes part in orbax's checkpoint saves; only the
primary process (index 0) writes metrics.jsonl, TensorBoard events, config.json and the console.
"""

from __future__ import annotations

import jax

from scaling_sparse.config import ConfigError
from scaling_sparse.process_watch import DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_INIT_TIMEOUT_S, cluster_detected


def _timeouts(init_timeout: int, heartbeat_timeout: int) -> dict:
    """JAX's keyword arguments for the two waits, those this JAX version has."""
    import inspect

    known = inspect.signature(jax.distributed.initialize).parameters
    wanted = {"initialization_timeout": init_timeout, "heartbeat_timeout_seconds": heartbeat_timeout}
    return {k: v for k, v in wanted.items() if k in known}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, init_timeout: int = DEFAULT_INIT_TIMEOUT_S,
               heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> bool:
    """Starts the multi-process runtime when asked or detected; returns True if it did. `init_timeout`:
    seconds to wait for every process to join; `heartbeat_timeout`: seconds without a heartbeat after
    which a process counts as dead. Either ends the run through process_watch.py's message."""
    if init_timeout < 1 or heartbeat_timeout < 1:
        raise ConfigError(f"--distributed_init_timeout and --distributed_heartbeat_timeout must be >= 1 s, got "
                          f"{init_timeout} and {heartbeat_timeout}")
    timeouts = _timeouts(init_timeout, heartbeat_timeout)
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise ConfigError("multi-process runs need all three of --coordinator_address=HOST:PORT, "
                              "--num_processes=N and --process_id=I (or none of them under SLURM / on a TPU VM)")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id={process_id} must be in 0..{num_processes - 1} (--num_processes)")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, **timeouts)
        return True
    if cluster_detected():
        jax.distributed.initialize(**timeouts)
        return True
    return False


def is_primary() -> bool:
    """Process 0 writes the run's files and the console output."""
    return jax.process_index() == 0
