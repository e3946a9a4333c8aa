"""Adafactor's second-moment estimate, factored over the same two dimensions of every weight as the
reference factors them (docs/semantics.md §5c).

trax's `Adafactor` (trax/optimizers/adafactor.py) factors every array with >= 2 dimensions over its
last two dimensions *as trax stores it*, whatever their sizes; optax's `scale_by_factored_rms`
factors the two largest dimensions and only from 128 up. Most of our arrays are stored as trax stores
them (or transposed, which gives the same estimate: the factoring is symmetric in rows and columns),
so trax's rule applies to them as they are. The exception is the sparse FFN: trax stores W1 as
[d, B, N] and W2 as [N, B, d] (its `_SparseFFMain`), we store both as [B, N, d] (docs §1), so
`reference_factored_dims` names the two dimensions of our layout that are trax's last two.

The rest of Adafactor (update clipping, learning rate, parameter scale, weight decay) is optax's
building blocks, chained in optim.py.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# Our sparse-FFN weights: trax's storage of each as dims of ours (trax's last two = the factored pair).
_SPARSE_FFN_AXES = ("blocks", "units", "embed")
_SPARSE_FFN_FACTORED = {"w1": (0, 1),   # trax [d, B, N]: factored over (B, N), one pair per d
                        "w2": (0, 2)}   # trax [N, B, d]: factored over (B, d), one pair per N


def reference_factored_dims(name: str, shape: tuple, axes: tuple | None) -> tuple[int, int] | None:
    """(row dim, column dim) of our array that trax's Adafactor factors, or None (a full second
    moment: arrays that trax stores with one dimension). Other dimensions are independent (one
    factored pair per index), as trax's leading dimensions are. `name` is the parameter's own name
    (its last path key), needed only where two weights share axes but not trax's layout."""
    if axes is not None and tuple(axes) == _SPARSE_FFN_AXES:
        if name not in _SPARSE_FFN_FACTORED:
            raise ValueError(f"Adafactor: a {_SPARSE_FFN_AXES} parameter named {name!r}: its trax layout "
                             f"is unknown. Fix: name it one of {sorted(_SPARSE_FFN_FACTORED)} or add it to "
                             "_SPARSE_FFN_FACTORED in scaling_sparse/adafactor.py.")
        return _SPARSE_FFN_FACTORED[name]
    return (len(shape) - 2, len(shape) - 1) if len(shape) >= 2 else None


class FactoredState(NamedTuple):
    """Per parameter (trees shaped like the params): row and column statistics if factored, else the
    full second moment `v` (the parameter's shape, so it takes the parameter's sharding, state.py);
    unused slots hold a scalar placeholder."""

    count: jax.Array
    v_row: Any
    v_col: Any
    v: Any


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _factored_dims(params, param_axes) -> tuple[list, Any]:
    """-> (the factored pair of each leaf of `params`, in flattening order; the params treedef)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    axes_of = {}
    if param_axes is not None:
        flat_axes, _ = jax.tree_util.tree_flatten_with_path(
            param_axes, is_leaf=lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))
        axes_of = {tuple(map(_key_name, path)): axes for path, axes in flat_axes}
    dims = []
    for path, leaf in leaves:
        keys = tuple(map(_key_name, path))
        if param_axes is not None and keys not in axes_of:
            raise ValueError(f"Adafactor: no logical axes for parameter {'/'.join(keys)}. Fix: pass the "
                             "model's axes (state.model_spec(m).axes) for the same params tree.")
        dims.append(reference_factored_dims(keys[-1] if keys else "", jnp.shape(leaf), axes_of.get(keys)))
    return dims, treedef


def _drop(shape, dim) -> tuple:
    return tuple(s for i, s in enumerate(shape) if i != dim)


def scale_by_factored_rms(param_axes=None, decay_rate: float = 0.8,
                          epsilon1: float = 1e-16) -> optax.GradientTransformation:
    """g -> g / sqrt(V_hat), trax's `Adafactor.update` up to (not including) the update clipping.

    V_hat is the factored (or, for 1-D arrays, full) exponential average of g^2 with decay
    1 - s^-0.8 at the reference's step s = count + 2 (trax's first update is its step 1 and it
    uses (step + 1)^-0.8). epsilon1 is added to the statistics (not to g^2, as optax does):
    row factor sqrt(mean(v_row) / (v_row + eps1)), column factor (v_col + eps1)^-1/2.
    `param_axes`: the params' logical axes (state.model_spec(m).axes); None applies trax's rule to
    the arrays as stored (last two dimensions)."""

    def init_fn(params):
        dims, treedef = _factored_dims(params, param_axes)
        placeholder = jnp.zeros((), jnp.float32)
        rows, cols, full = [], [], []
        for leaf, d in zip(jax.tree.leaves(params), dims):
            shape = jnp.shape(leaf)
            rows.append(placeholder if d is None else jnp.zeros(_drop(shape, d[1]), jnp.float32))
            cols.append(placeholder if d is None else jnp.zeros(_drop(shape, d[0]), jnp.float32))
            full.append(jnp.zeros(shape, jnp.float32) if d is None else placeholder)
        unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
        return FactoredState(jnp.zeros((), jnp.int32), unflat(rows), unflat(cols), unflat(full))

    def update_fn(updates, state, params=None):
        del params
        dims, treedef = _factored_dims(updates, param_axes)
        decay = 1.0 - (state.count.astype(jnp.float32) + 2.0) ** (-decay_rate)
        mix = 1.0 - decay
        out, rows, cols, full = [], [], [], []
        for g, d, v_row, v_col, v in zip(treedef.flatten_up_to(updates), dims, treedef.flatten_up_to(state.v_row),
                                         treedef.flatten_up_to(state.v_col), treedef.flatten_up_to(state.v)):
            g32 = g.astype(jnp.float32)
            g2 = g32 * g32
            if d is None:
                v = decay * v + mix * g2
                y = g32 * (v + epsilon1) ** -0.5
            else:
                r, c = d
                v_row = decay * v_row + mix * jnp.mean(g2, axis=c)   # mean over columns: one per row
                v_col = decay * v_col + mix * jnp.mean(g2, axis=r)   # mean over rows: one per column
                row_mean = jnp.mean(v_row, axis=r if r < c else r - 1, keepdims=True)
                row_factor = jnp.expand_dims(jnp.sqrt(row_mean / (v_row + epsilon1)), c)
                col_factor = jnp.expand_dims((v_col + epsilon1) ** -0.5, r)
                y = g32 * row_factor * col_factor
            out.append(y.astype(g.dtype))
            rows.append(v_row)
            cols.append(v_col)
            full.append(v)
        unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
        return unflat(out), FactoredState(optax.safe_increment(state.count), unflat(rows), unflat(cols),
                                          unflat(full))

    return optax.GradientTransformation(init_fn, update_fn)
