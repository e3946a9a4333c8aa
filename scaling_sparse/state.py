"""The one state builder: from a config to running state, on any mesh (docs/architecture.md).

    abstract model (nnx.eval_shape, here and nowhere else)
      -> partition specs (each parameter's logical axis names through config.mesh.rules)
      -> jax.jit(init, out_shardings=...)      a fresh run: every array is created sharded, in
                                                place; no full copy on one device or the host
      or orbax restore with the same shardings  a resumed run, eval, generate: a checkpoint written
                                                on any mesh restores onto this one

train, eval, generate, params and the benchmarks all start here (maxtext's `get_abstract_state`
plays the same role). The model is held split, as (graphdef, params): params a pure dict of
arrays; `nnx.merge(graphdef, params)` inside a jitted function rebuilds the module.

Train state: {"params", "opt_state", "step", "rng"}. Optimizer-state leaves that mirror a parameter
(Adam's moments, Adafactor's unfactored second moments) take the parameter's sharding; Adafactor's
factored statistics (row and column vectors) are small and replicated.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding

from scaling_sparse import sharding
from scaling_sparse.config import ModelConfig
from scaling_sparse.layers.base import AXES_KEY
from scaling_sparse.models import build_model
from scaling_sparse.optim import make_optimizer, optimizer_settings
from scaling_sparse.quantize import Int8Weight, quantize_model, scale_axes


@dataclasses.dataclass(frozen=True, eq=False)
class ModelSpec:
    """The model without weights: its graph, parameter shapes and logical axis names (pure dicts)."""

    graphdef: object
    params: dict      # path -> jax.ShapeDtypeStruct
    axes: dict        # path -> tuple of logical axis names, one per dimension

    def specs(self, rules) -> dict:
        return jax.tree.map(lambda axes: sharding.spec_of(axes, rules), self.axes, is_leaf=_is_axes)

    def shardings(self, mesh: Mesh, rules) -> dict:
        """NamedShardings of the parameters; a ConfigError if a mesh axis does not divide a dimension."""
        specs = self.specs(rules)
        flat_params = traverse_util.flatten_dict(self.params)
        flat_specs = traverse_util.flatten_dict(specs, is_leaf=lambda _, x: isinstance(x, jax.sharding.PartitionSpec))
        flat_axes = traverse_util.flatten_dict(self.axes, is_leaf=lambda _, x: _is_axes(x))
        for path, leaf in flat_params.items():
            spec, axes = flat_specs[path], flat_axes[path]
            if isinstance(leaf, Int8Weight):  # int8 values and their scales: the values carry the weight's axes
                leaf, spec, axes = leaf.q, spec.q, axes.q
            sharding.check_divisible("/".join(map(str, path)), leaf.shape, spec, mesh, axes)
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


@functools.lru_cache(maxsize=32)
def model_spec(m: ModelConfig) -> ModelSpec:
    """The abstract model of a ModelConfig (no memory allocated; cached per config)."""
    abstract = nnx.eval_shape(lambda: build_model(m, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)  # raises if a layer holds non-parameter state
    axes = {}
    for path, variable in state.flat_state():
        names = variable.get_metadata().get(AXES_KEY)
        if names is None:
            raise ValueError(f"parameter {'/'.join(map(str, path))} has no logical axis names: create it with "
                             "scaling_sparse.layers.base.param(value, *axes)")
        value = variable.get_value()
        axes[path] = scale_axes(names, value) if isinstance(value, Int8Weight) else names
    return ModelSpec(graphdef, state.to_pure_dict(), traverse_util.unflatten_dict(axes))


def params_bytes(tree) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- parameters only

@functools.lru_cache(maxsize=16)
def _init_params_program(m: ModelConfig, seed: int, mesh: Mesh, rules: tuple, dtype: str | None):
    spec = model_spec(m)

    def init():
        params = nnx.state(build_model(m, rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict()
        return params if dtype is None else cast_floating(params, dtype)

    return jax.jit(init, out_shardings=spec.shardings(mesh, rules))


def init_params(m, mesh: Mesh, rules, *, seed: int = 0, dtype: str | None = None):
    """-> (graphdef, params): freshly initialised weights, created sharded (random weights for
    benchmarks and tests; training starts from init_train_state). `dtype` casts floating weights."""
    m = ModelConfig.from_config(m)
    params = _init_params_program(m, int(seed), mesh, tuple(rules), dtype)()
    return model_spec(m).graphdef, params


def cast_floating(tree, dtype):
    """Floating leaves cast to `dtype` (once, e.g. before decoding; not per token)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


# ----------------------------------------------------------------------------- train state

def train_key(seed: int) -> jax.Array:
    # Distinct from the init stream (nnx.Rngs(seed)) so dropout/Gumbel noise is not tied to the init.
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


def _mirror_shardings(abstract_opt_state, params: dict, param_shardings: dict, mesh: Mesh):
    """An optimizer-state leaf whose path ends with a parameter's path and has its shape takes its
    sharding; any other leaf (counts, factored statistics) is replicated."""
    flat_params = traverse_util.flatten_dict(params)
    flat_shardings = traverse_util.flatten_dict(param_shardings,
                                                is_leaf=lambda _, x: isinstance(x, NamedSharding))
    replicated = sharding.replicated(mesh)

    def keys_of(path):
        return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)

    def choose(path, leaf):
        keys = keys_of(path)
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in flat_params:
                return flat_shardings[suffix] if flat_params[suffix].shape == leaf.shape else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(choose, abstract_opt_state)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainStateLayout:
    """Everything needed to create or restore a train state on one mesh."""

    graphdef: object
    abstract: dict     # {"params", "opt_state", "step", "rng"}: ShapeDtypeStructs carrying their shardings
    shardings: dict    # the same tree of NamedShardings
    mesh: Mesh
    rules: tuple
    axes: dict = None  # the parameters' logical axis names: Adafactor's factoring reads them (adafactor.py)

    @property
    def param_shardings(self) -> dict:
        return self.shardings["params"]


@functools.lru_cache(maxsize=16)
def _layout(m: ModelConfig, settings: tuple, mesh: Mesh, rules: tuple) -> TrainStateLayout:
    spec = model_spec(m)
    param_shardings = spec.shardings(mesh, rules)
    # int8 weights are for eval and decoding (train refuses them): no optimizer state.
    opt_state = {} if m.weights == "int8" else jax.eval_shape(make_optimizer(dict(settings), spec.axes).init,
                                                                spec.params)
    replicated = sharding.replicated(mesh)
    shardings = {"params": param_shardings,
                 "opt_state": _mirror_shardings(opt_state, spec.params, param_shardings, mesh),
                 "step": replicated, "rng": replicated}
    shapes = {"params": spec.params, "opt_state": opt_state, "step": jax.ShapeDtypeStruct((), jnp.int32),
              "rng": jax.eval_shape(lambda: train_key(0))}
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return TrainStateLayout(spec.graphdef, abstract, shardings, mesh, rules, spec.axes)


def train_state_layout(config, mesh: Mesh) -> TrainStateLayout:
    return _layout(ModelConfig.from_config(config.model), optimizer_settings(config.train), mesh,
                   sharding.logical_rules(config.mesh))


@functools.lru_cache(maxsize=16)
def _init_train_program(layout: TrainStateLayout, m: ModelConfig, settings: tuple, seed: int):
    tx = make_optimizer(dict(settings), layout.axes)

    def init():
        params = nnx.state(build_model(m, rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict()
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": train_key(seed)}

    # One jitted program: every array is created with its sharding (and eager init would compile
    # every initializer separately, which dominates start-up for small models).
    return jax.jit(init, out_shardings=layout.shardings)


def train_state_program(config, mesh: Mesh):
    """-> (layout, the jitted program creating a fresh sharded train state): lower it for XLA's
    compiled memory analysis (benchmarks/sharded_memory.py), or call it (init_train_state)."""
    layout = train_state_layout(config, mesh)
    return layout, _init_train_program(layout, ModelConfig.from_config(config.model),
                                       optimizer_settings(config.train), int(config.train.seed))


def init_train_state(config, mesh: Mesh) -> tuple[TrainStateLayout, dict]:
    """A fresh train state, created sharded on `mesh`."""
    layout, program = train_state_program(config, mesh)
    return layout, program()


def restore_train_state(config, mesh: Mesh, checkpointer, step: int | None = None, echo=None):
    """The newest readable (or the given) checkpointed train state, restored sharded onto `mesh`
    -> (layout, state, data_state, [(unreadable newer step, reason)])."""
    layout = train_state_layout(config, mesh)
    state, data_state, _, failures = checkpointer.restore_readable(layout.abstract, step, echo=echo)
    return layout, state, data_state, failures


def restore_params(config, mesh: Mesh, checkpointer, step: int | None = None, dtype: str | None = None,
                   echo=None, weights: str | None = None):
    """-> (graphdef, params, step): the newest readable (or the given) checkpoint's weights only,
    restored sharded onto `mesh` (for eval and generate: the optimizer state is not read). `weights`
    "int8" / "float": converted from what the checkpoint holds (config.model.weights) if it differs."""
    layout = train_state_layout(config, mesh)
    target = {"params": layout.abstract["params"], "step": layout.abstract["step"]}
    state, _, _, _ = checkpointer.restore_readable(target, step, partial=True, echo=echo)
    graphdef, params = layout.graphdef, state["params"]
    if weights is not None and weights != config.model.get("weights", "float"):
        graphdef, params = convert_weights(config.model, params, weights, mesh, layout.rules)
    params = params if dtype is None else cast_floating(params, dtype)
    return graphdef, params, int(state["step"])


def convert_weights(model_config, params, weights: str, mesh: Mesh, rules) -> tuple[object, dict]:
    """Params of model_config's model -> (graphdef, params) of the same model with `weights` "int8"
    (quantised, quantize.py) or "float" (dequantised), created with that model's shardings."""
    m = ModelConfig.from_config(model_config)
    source, target = model_spec(m), model_spec(dataclasses.replace(m, weights=weights))

    def convert(params):
        if weights == "int8":
            return nnx.state(quantize_model(nnx.merge(source.graphdef, params)), nnx.Param).to_pure_dict()
        return jax.tree.map(lambda w: w[...] if isinstance(w, Int8Weight) else w, params,
                            is_leaf=lambda x: isinstance(x, Int8Weight))

    return target.graphdef, jax.jit(convert, out_shardings=target.shardings(mesh, rules))(params)
