"""The device mesh and the logical-axis rules (docs/architecture.md, "Sharding").

Every parameter carries logical axis names (layers/base.py `param`); `config.mesh.rules` maps
each name to mesh axes, as flax's lm1b example and maxtext do, and `config.mesh.{data,fsdp,tensor}`
sizes the mesh. JAX's own runtime does the rest: arrays are `jax.Array`s with `NamedSharding`s,
jitted steps are partitioned by XLA (GSPMD), and several hosts are one mesh once
`jax.distributed.initialize` has run (distributed.py).

Invalid meshes (sizes that do not multiply to the device count, an axis that does not divide the
dimension it shards, a batch the data axes do not divide) are ConfigErrors naming the field and the
fix, raised before anything is built or written.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scaling_sparse.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config, n_devices: int) -> tuple[int, ...]:
    """config.mesh -> the (data, fsdp, tensor) sizes, with one -1 resolved to the devices left."""
    sizes = [mesh_config[a] for a in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes):
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ConfigError(f"config.mesh.{axis}: must be a positive integer or -1 (all devices left), "
                              f"got {size!r}. Fix: e.g. --config.mesh.{axis}=2")
    if sizes.count(-1) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}. "
                          "Fix: give the other axes explicit sizes")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"config.mesh: the fixed axes ({known} devices) do not divide the {n_devices} "
                              f"devices. Fix: choose sizes whose product divides {n_devices}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"config.mesh: data x fsdp x tensor = {' x '.join(map(str, sizes))} = {math.prod(sizes)}, but "
            f"there are {n_devices} devices. Fix: make the product {n_devices}, or set one axis to -1 "
            f"(e.g. --config.mesh.data=-1)")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    kwargs = {}
    if hasattr(jax.sharding, "AxisType"):  # GSPMD-propagated ("auto") axes, as the train step expects
        kwargs["axis_types"] = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, devices=devices, **kwargs)


def single_device_mesh(device=None) -> Mesh:
    """A 1x1x1 mesh: the unsharded layout, with the same code path."""
    device = jax.devices()[0] if device is None else device
    return Mesh(np.asarray([device]).reshape(1, 1, 1), MESH_AXES)


def logical_rules(mesh_config) -> tuple:
    """config.mesh.rules as a tuple of (name, mesh axes) with mesh axes a str, a tuple or None."""
    rules = []
    for rule in mesh_config.rules:
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ConfigError(f"config.mesh.rules: {name!r} maps to unknown mesh axis {a!r}. "
                                  f"Fix: use mesh axes of {MESH_AXES} or None")
        rules.append((name, axes))
    return tuple(rules)


def spec_of(axes: tuple, rules) -> PartitionSpec:
    """Logical axis names -> PartitionSpec (names without a rule are replicated)."""
    known = {name for name, _ in rules}
    return nn.logical_to_mesh_axes(tuple(a if a in known else None for a in axes), rules)


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def check_divisible(path: str, shape: tuple, spec: PartitionSpec, mesh: Mesh, axes: tuple) -> None:
    for dim, (size, entry, name) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape), axes)):
        parts = _axis_size(mesh, entry)
        if size % parts:
            raise ConfigError(
                f"config.mesh: parameter {path} has shape {shape}; its dimension {dim} ({name!r}, size {size}) "
                f"is sharded over mesh axes {entry} of size {parts}, which does not divide it. Fix: choose "
                f"mesh sizes dividing {size} (e.g. --config.mesh.{entry if isinstance(entry, str) else entry[0]}=1), "
                f"or map {name!r} to other axes in config.mesh.rules")


def batch_spec(rules) -> PartitionSpec:
    """[batch, length] arrays: the batch over the axes the 'batch' rule names."""
    return spec_of(("batch", "length"), rules)


def check_batch(batch_size: int, mesh: Mesh, rules, process_count: int = 1) -> None:
    parts = _axis_size(mesh, batch_spec(rules)[0])
    if batch_size % parts:
        raise ConfigError(f"config.train.batch_size: {batch_size} is not divisible by the {parts} devices the "
                          f"batch is sharded over (config.mesh data x fsdp). Fix: use a multiple of {parts}")
    if batch_size % process_count:
        raise ConfigError(f"config.train.batch_size: {batch_size} is not divisible by the {process_count} "
                          f"processes. Fix: use a multiple of {process_count}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------- activations

_activation_context: tuple | None = None  # (mesh, rules) while a sharded step is being traced


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
    """Within this context (entered inside a jitted function, so it holds while tracing), `constrain`
    pins activations to their logical layout; outside it `constrain` does nothing (e.g. decoding)."""
    global _activation_context
    previous, _activation_context = _activation_context, (mesh, tuple(rules))
    try:
        yield
    finally:
        _activation_context = previous


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """x with one logical axis name per dimension -> x laid out as the rules say (dimensions the
    mesh axes do not divide are left replicated). Without this GSPMD chooses the layout from the
    weights, e.g. splits sparse QKV's module axis, whose convolution gradient it then gets wrong on
    CPU (tests/test_sharding.py)."""
    if _activation_context is None:
        return x
    mesh, rules = _activation_context
    spec = tuple(entry if x.shape[i] % _axis_size(mesh, entry) == 0 else None
                 for i, entry in enumerate(tuple(spec_of(axes, rules)) + (None,) * (x.ndim - len(axes))))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))
