"""Dense Q, K, V projections: three Dense(d, d), as the reference builds them (docs/semantics.md §5b):
each Glorot-uniform over its own [d, d], biases N(0, 1e-6^2), and Adafactor factors each matrix on
its own. With shared-QK LSH attention there is no K projection at all (the keys are the queries,
docs/semantics.md §4), so no weights are built, counted or read that nothing uses.

Follows the decode protocol of layers/base.py (sparse_qkv.py too):
  qkv(x) -> (q, k, v), each [batch, T, d_model] (k is None when `shared_qk`);
  qkv.init_cache(batch, cache_len, dtype); qkv.decode(x, cache, index) -> ((q, k, v), cache);
  qkv.params_per_token().
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.layers.base import no_cache
from scaling_sparse.layers.dense import glorot_uniform, make_linear


class DenseQKV(nnx.Module):
    component = "attention"

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, shared_qk: bool = False, init: str = "reference",
                 param_dtype=jnp.float32, d_inner: int | None = None, rank: int = 0):
        """init (model.qkv_init): "reference" = Glorot-uniform over each [d, d]; "fused" = the limits of
        one Glorot-uniform [d, 3d], sqrt(2) smaller (docs/semantics.md §5b). d_inner: the heads' total
        width (default d_model; a CoFi-pruned model's differs); rank > 0: each projection as two rank-r
        factors (SVD / ASVD, docs/compression.md)."""
        d_inner = d_model if d_inner is None else d_inner
        kernel_init = glorot_uniform if init == "reference" else nnx.initializers.variance_scaling(
            0.5, "fan_avg", "uniform")  # [d, d]'s fan_avg d, a [d, 3d]'s 2d
        dense = lambda: make_linear(d_model, d_inner, rank=rank, rngs=rngs, axes=("embed", "heads"),  # noqa: E731
                                    kernel_init=kernel_init, param_dtype=param_dtype)
        self.q = dense()
        self.k = None if shared_qk else dense()
        self.v = dense()

    def __call__(self, x: jax.Array):
        return self.q(x), None if self.k is None else self.k(x), self.v(x)

    init_cache = staticmethod(no_cache)

    def decode(self, x: jax.Array, cache, index):
        return self(x), cache

    def params_per_token(self) -> int:
        return sum(p.params_per_token() for p in (self.q, self.k, self.v) if p is not None)
