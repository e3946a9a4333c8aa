"""Sparse Q, K, V (docs/semantics.md §2): one multiplicative layer shared by Q, K and V, then a causal
convolution over (length, modules) per Q/K/V: kernel (kl, 3) for Q and K, (kl, 1) for V.

Follows the decode protocol of layers/base.py (the index is unused: the cache is a rolling history). The decode cache holds the last kl-1 multiplicative outputs
(before the convolutions, which all read the same input), so decoding T >= 1 new positions equals the
full causal pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.kernels import cpu as cpu_kernels
from scaling_sparse.layers.multiplicative import ModuleConv, MultiplicativeDense
from scaling_sparse.quantize import is_int8


class SparseQKV(nnx.Module):
    component = "attention"

    def __init__(self, d_model: int, n_modules: int, *, length_kernel: int = 3, rngs: nnx.Rngs,
                 conv_init: str = "reference", param_dtype=jnp.float32):
        if n_modules < 1 or d_model % n_modules:
            raise ValueError(f"SparseQKV: d_model {d_model} is not divisible by attn_sparsity {n_modules}; "
                             "choose S dividing d_model (e.g. n_heads)")
        self.d_model, self.n_modules = d_model, n_modules
        self.d_module = d_model // n_modules
        self.length_kernel = length_kernel
        self.mult = MultiplicativeDense(d_model, d_model, n_modules, rngs=rngs, param_dtype=param_dtype)
        conv = lambda ks: ModuleConv(n_modules, self.d_module, length_kernel=length_kernel, module_kernel=ks,
                                     rngs=rngs, init=conv_init, param_dtype=param_dtype)
        self.conv_q, self.conv_k, self.conv_v = conv(3), conv(3), conv(1)

    def _shared(self, x):
        """x [b, T, d] -> the multiplicative output as modules [b, T, S, M]."""
        return self.mult(x).reshape(*x.shape[:-1], self.n_modules, self.d_module)

    def _convs(self, h):
        """h [b, history + T, S, M] -> (q, k, v) each [b, T, d]."""
        b = h.shape[0]
        return tuple(c(h).reshape(b, -1, self.d_model) for c in (self.conv_q, self.conv_k, self.conv_v))

    def __call__(self, x: jax.Array):
        h = self._shared(x)
        history = self.length_kernel - 1
        h = jnp.pad(h, ((0, 0), (history, 0), (0, 0), (0, 0)))  # causal zero padding
        return self._convs(h)

    def init_cache(self, batch: int, cache_len: int, dtype):
        # Zeros equal the causal padding of the full pass, so a prefill at index 0 needs no special case.
        return {"history": jnp.zeros((batch, self.length_kernel - 1, self.n_modules, self.d_module), dtype)}

    def _kernel(self, x, history) -> str | None:
        """Which CPU kernel decodes this step: "float32" or "int8" (all matrices int8, quantize.py), for one new
        position in float32 traced by a Decoder using the CPU kernels; None for the JAX path."""
        matrices = [self.mult.gates, self.mult.kernel] + [c.kernel for c in (self.conv_q, self.conv_k, self.conv_v)]
        biases = [self.mult.bias] + [c.bias for c in (self.conv_q, self.conv_k, self.conv_v)]
        if not (cpu_kernels.active() and x.shape[1] == 1 and x.dtype == history.dtype == jnp.float32
                and all(not is_int8(w) and w[...].dtype == jnp.float32 for w in biases)):
            return None
        if all(not is_int8(w) and w[...].dtype == jnp.float32 for w in matrices):
            return "float32"
        return "int8" if all(is_int8(w) for w in matrices) else None

    def decode(self, x: jax.Array, cache, index):
        kernel = self._kernel(x, cache["history"])
        if kernel:
            b = x.shape[0]
            convs = [(c.kernel.get_value(), c.bias[...]) for c in (self.conv_q, self.conv_k, self.conv_v)]
            call = cpu_kernels.sparse_qkv_decode_int8 if kernel == "int8" else cpu_kernels.sparse_qkv_decode
            qkv, history = call(x.reshape(b, self.d_model), self.mult.gates.get_value(), self.mult.kernel.get_value(),
                                self.mult.bias[...], cache["history"], *convs)
            return tuple(t.reshape(b, 1, self.d_model) for t in qkv), {"history": history}
        h = jnp.concatenate([cache["history"], self._shared(x).astype(cache["history"].dtype)], axis=1)
        h = h.astype(x.dtype)
        history = self.length_kernel - 1
        new_cache = {"history": h[:, h.shape[1] - history:].astype(cache["history"].dtype)}
        return self._convs(h), new_cache

    def params_per_token(self) -> int:
        return self.mult.params_per_token() + sum(c.params_per_token() for c in (self.conv_q, self.conv_k,
                                                                                 self.conv_v))
