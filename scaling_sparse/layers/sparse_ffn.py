"""Sparse feed-forward layer (docs/semantics.md §1): a low-rank controller picks one unit per block of N.

Shapes: d = d_model, f = d_ff, N units per block, B = f / N blocks, r = controller rank.
  controller: logits[..., b, n] = ((x @ C1) @ C2)[..., b, n] + cb[b, n]; C1 [d, r], C2 [r, B, N], cb [B, N]
  main:       h = relu((x @ W1) * mask), y = h @ W2 + b2; W1 and W2 both stored [B, N, d], no b1.
Modes:
  train:  Gumbel noise (temperature T scales it) picks k = argmax(log p + T g); the straight-through mask
          onehot(k) + p - stop_gradient(p) is used with probability quant_prob (one scalar draw per call),
          otherwise the soft mask p = softmax(logits). Dropout on the output y (none on h). All randomness comes from `rng`, so
          the same key gives bit-identical masks (the reversible stack relies on it).
  eval:   mask = onehot(argmax logits), dense compute.
  decode: the same argmax, but only the chosen row of each block is gathered from W1 and W2:
          y = sum_b relu(x . W1[b, k_b]) W2[b, k_b] + b2. The unit axis leads, so each gather reads
          B contiguous rows of d values; no transposes and no f-sized masks.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from scaling_sparse.kernels import cpu as cpu_kernels
from scaling_sparse.layers.argmax import first_argmax
from scaling_sparse.layers.base import check_mode, no_cache, param
from scaling_sparse.layers.dense import tiny_normal
from scaling_sparse.layers.dropout import dropout
from scaling_sparse.layers.row_matmul import matmul_rows, matmul_rows_t
from scaling_sparse.quantize import is_int8, matmul


def _glorot(in_axis, out_axis):
    return nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis)


_RECORD_UNITS = contextvars.ContextVar("scaling_sparse_record_units", default=False)


@contextlib.contextmanager
def recording_units():
    """SparseFF.decode traced inside this context sows each step's chosen units (nnx.Intermediate "units")."""
    token = _RECORD_UNITS.set(True)
    try:
        yield
    finally:
        _RECORD_UNITS.reset(token)


class SparseFF(nnx.Module):
    # int8 (quantize.py): a scale per unit row of the [B, N, d] stores (decode gathers rows with their
    # scales), per output channel of the controller's two factors; the biases stay float.
    INT8_AXES = {"w1": (2,), "w2": (2,), "c1": (0,), "c2": (0,)}

    component = "ffn"

    def __init__(self, d_model: int, d_ff: int, n_elements: int, *, lowrank: int = 0, temperature: float = 0.1,
                 quant_prob: float = 0.3, dropout_rate: float = 0.0, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if n_elements < 2 or d_ff % n_elements:
            raise ValueError(f"SparseFF: d_ff {d_ff} must be a multiple of ff_sparsity {n_elements} (>= 2); "
                             "choose d_ff as a multiple of model.ff_sparsity")
        lowrank = lowrank or d_ff // n_elements
        if not 0 < lowrank <= min(d_model, d_ff):
            raise ValueError(f"SparseFF: controller rank {lowrank} must be in 1..min(d_model, d_ff)="
                             f"{min(d_model, d_ff)}; lower model.ff_lowrank")
        self.d_model, self.d_ff, self.n_elements = d_model, d_ff, n_elements
        self.n_blocks, self.lowrank = d_ff // n_elements, lowrank
        self.temperature, self.quant_prob, self.dropout_rate = float(temperature), float(quant_prob), dropout_rate
        b, n, d, r = self.n_blocks, n_elements, d_model, lowrank
        # Glorot-uniform over the logical [d, f] / [f, d] / [d, r] / [r, f] matrices; biases N(0, 1e-6^2).
        # One draw from the Rngs stream per layer (each draw is costly under nnx.eval_shape), split here.
        keys = jax.random.split(rngs.params(), 6)
        self.w1 = param(_glorot(-1, (0, 1))(keys[0], (b, n, d), param_dtype), "blocks", "units", "embed")
        self.w2 = param(_glorot((0, 1), -1)(keys[1], (b, n, d), param_dtype), "blocks", "units", "embed")
        self.b2 = param(tiny_normal(keys[2], (d,), param_dtype), "embed")
        self.c1 = param(_glorot(0, 1)(keys[3], (d, r), param_dtype), "embed", "lowrank")
        self.c2 = param(_glorot(0, (1, 2))(keys[4], (r, b, n), param_dtype), "lowrank", "blocks", "units")
        self.cb = param(tiny_normal(keys[5], (b, n), param_dtype), "blocks", "units")

    # -- controller -------------------------------------------------------------------------------
    def controller_logits(self, x: jax.Array) -> jax.Array:
        """x [..., d] -> logits [..., B, N]: two small matmuls through the rank-r bottleneck."""
        low = matmul(x, self.c1)
        if is_int8(self.c2):  # [r, B, N] as [r, B N] with a scale per unit (quantize.matmul)
            logits = matmul(low, self.c2.get_value().reshape(self.c2.shape[0], -1)).reshape(*low.shape[:-1], *self.c2.shape[1:])
        else:
            logits = jnp.einsum("...r,rbn->...bn", low, self.c2[...].astype(x.dtype))
        return logits + self.cb[...].astype(x.dtype)

    def choose(self, x: jax.Array) -> jax.Array:
        """The deterministic choice: unit index per block, [..., B] int32."""
        return first_argmax(self.controller_logits(x), axis=-1)

    def _log_p(self, x):
        return jax.nn.log_softmax(self.controller_logits(x).astype(jnp.float32), axis=-1)

    def _gumbel_choice(self, log_p, rng):
        u = jax.random.uniform(jax.random.split(rng, 3)[0], log_p.shape, jnp.float32, 1e-6, 1.0 - 1e-6)
        choice = jnp.argmax(log_p - self.temperature * jnp.log(-jnp.log(u)), axis=-1)
        return choice.astype(self._choice_dtype)

    def use_hard(self, rng) -> jax.Array:
        """The step's one scalar draw: True (probability quant_prob) = the straight-through hard mask."""
        return jax.random.uniform(jax.random.split(rng, 3)[1], ()) < self.quant_prob

    def train_choice(self, x: jax.Array, rng) -> jax.Array:
        """The training-mode choice [..., B]: argmax of log p plus Gumbel noise scaled by the temperature.
        The reversible stack stores it (mask memory) and passes it back as `choice`. Only a hard step
        uses it: on a soft step no noise is drawn and the choice is zeros (unused)."""
        log_p = self._log_p(x)
        return jax.lax.cond(self.use_hard(rng), lambda: self._gumbel_choice(log_p, rng),
                            lambda: jnp.zeros(log_p.shape[:-1], self._choice_dtype))

    @property
    def _choice_dtype(self):
        return jnp.uint8 if self.n_elements <= 256 else jnp.int32  # small for mask memory

    def mask(self, x: jax.Array, mode: str = "eval", rng=None, choice=None) -> jax.Array:
        """The block mask [..., B, N] in x's dtype; in train mode a pure function of (weights, x, rng),
        with the units given by `choice` when it is passed (train_choice's output).

        Training: with probability quant_prob (one scalar draw) the straight-through hard mask
        onehot(k) + p - stop_gradient(p), else the soft mask p. The branch is a `lax.cond`, so the
        Gumbel noise over [tokens, B, N] is drawn only on the hard steps that use it."""
        if not check_mode(mode):
            return jax.nn.one_hot(self.choose(x), self.n_elements, dtype=x.dtype)
        if rng is None:
            raise ValueError("SparseFF in train mode needs an rng key (Gumbel noise and the hard/soft draw)")
        log_p = self._log_p(x)
        p = jnp.exp(log_p)

        def hard():
            units = self._gumbel_choice(log_p, rng) if choice is None else choice
            return jax.nn.one_hot(units, self.n_elements, dtype=p.dtype) + p - jax.lax.stop_gradient(p)

        return jax.lax.cond(self.use_hard(rng), hard, lambda: p).astype(x.dtype)

    # -- main path --------------------------------------------------------------------------------
    def __call__(self, x: jax.Array, *, mode: str = "eval", rng=None, choice=None) -> jax.Array:
        """`choice` (train mode): units picked in an earlier pass (the reversible stack's mask memory)."""
        train = check_mode(mode)
        mask = self.mask(x, mode, rng, choice).reshape(*x.shape[:-1], self.d_ff)
        units = (self.d_ff, self.d_model)  # [B, N, d] viewed as [f, d]: a free reshape
        h = jax.nn.relu(matmul_rows_t(x, self.w1[...].astype(x.dtype).reshape(units)) * mask)
        y = matmul_rows(h, self.w2[...].astype(x.dtype).reshape(units)) + self.b2[...].astype(x.dtype)
        # One dropout, on the output; the hidden units are not dropped (trax sparsity.py SparseFF).
        return dropout(y, self.dropout_rate, jax.random.split(rng, 3)[2], train=True) if train else y

    init_cache = staticmethod(no_cache)

    def decode(self, x: jax.Array, cache, index):
        """Reads only the chosen row of each block: 2 B d main weights per token. Traced by a Decoder
        that uses the CPU kernels (scaling_sparse/kernels), the same computation is one kernel call."""
        weights = (self.c1, self.c2, self.cb, self.w1, self.w2, self.b2)
        if cpu_kernels.active() and x.dtype == jnp.float32:
            if all(not is_int8(w) and w[...].dtype == jnp.float32 for w in weights):
                y, units = cpu_kernels.sparse_ffn_decode(x, *(w[...] for w in weights), n_elements=self.n_elements)
                return self._recorded(y, units), cache
            int8 = (self.c1, self.c2, self.w1, self.w2)
            if all(is_int8(w) for w in int8) and all(w[...].dtype == jnp.float32 for w in (self.cb, self.b2)):
                y, units = cpu_kernels.sparse_ffn_decode_int8(x, *(w.get_value() for w in weights),
                                                               n_elements=self.n_elements)
                return self._recorded(y, units), cache
        units = self.choose(x)
        rows = units + jnp.arange(self.n_blocks, dtype=jnp.int32) * self.n_elements  # [..., B]
        flat = (self.n_blocks * self.n_elements, self.d_model)  # a free reshape of the [B, N, d] arrays
        # Indices are in range by construction, so skip the gather's bounds handling.
        gather = lambda w: _gather_rows(w, flat, rows).astype(x.dtype)
        w_in, w_out = gather(self.w1), gather(self.w2)  # [..., B, d] each
        h = jax.nn.relu(jnp.einsum("...d,...bd->...b", x, w_in))
        y = jnp.einsum("...b,...bd->...d", h, w_out) + self.b2[...].astype(x.dtype)
        return self._recorded(y, units), cache

    def _recorded(self, y, units):
        """y; inside `recording_units()` the step's chosen units [..., B] are also sown as an nnx.Intermediate
        "units" (benchmarks/decode_17b.py counts the distinct units a decode touches)."""
        if _RECORD_UNITS.get():
            self.sow(nnx.Intermediate, "units", units)
        return y

    def params_per_token(self) -> int:
        controller = self.c1.size + self.c2.size + self.cb.size
        return controller + 2 * self.n_blocks * self.d_model + self.b2.size


def _gather_rows(w: nnx.Param, flat: tuple[int, int], rows: jax.Array) -> jax.Array:
    """The chosen rows of a [B, N, d] store viewed as [B N, d]; int8 rows are gathered with their scales
    and dequantised after the gather (d + 1 values a row, not the whole store)."""
    value = w.get_value()
    if is_int8(value):
        q = value.q.reshape(flat).at[rows].get(mode="promise_in_bounds")
        scale = value.scale.reshape(flat[0], 1).at[rows].get(mode="promise_in_bounds")
        return q.astype(scale.dtype) * scale
    return value.reshape(flat).at[rows].get(mode="promise_in_bounds")
