"""Every layer / model variant (conftest.VARIANTS): each parameter carries one logical axis name (a str
or None) per dimension, and the component report counts every parameter exactly once."""

import jax
from flax import nnx

from scaling_sparse.layers.base import AXES_KEY


def params_of(model):
    """(path, nnx.Param) for every parameter of the model."""
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves and all(isinstance(v, nnx.Param) for _, v in leaves)
    return [(jax.tree_util.keystr(path), v) for path, v in leaves]


def test_every_parameter_names_one_logical_axis_per_dimension(variant):
    _, model = variant
    for path, v in params_of(model):
        metadata = v.get_metadata()
        assert AXES_KEY == "logical_axes" and AXES_KEY in metadata, f"{path} has no logical axes"
        axes = metadata[AXES_KEY]
        assert isinstance(axes, tuple), f"{path}: {axes!r} is not a tuple"
        assert len(axes) == v[...].ndim, f"{path}: axes {axes} for shape {v[...].shape}"
        assert all(a is None or isinstance(a, str) for a in axes), f"{path}: {axes}"


def test_components_count_every_parameter_exactly_once(variant):
    _, model = variant
    report = model.components()
    total = sum(v[...].size for _, v in params_of(model))
    assert sum(c["total"] for c in report.values()) == total
    assert all(c["total"] >= 0 and c["per_token"] >= 0 for c in report.values())
