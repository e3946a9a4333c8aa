"""Optimizers and learning-rate schedules (optax), built from `config.train`.

The reference (docs/semantics.md §5, §5c) trains with trax's Adafactor: no momentum (beta1 0),
second-moment decay exponent 0.8, second moments factored over the last two dimensions of every
weight as trax stores it (adafactor.py), epsilon1 1e-16, update clipping 1.0, parameter scaling
(floor 1e-3), decoupled weight decay 1e-5 falling linearly to 0 over 100000 steps, and learning rate
`1 / sqrt(max(step, warmup))`. AdamW and warmup + cosine are options.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

from scaling_sparse.adafactor import scale_by_factored_rms


def optimizer_settings(t) -> tuple:
    """The config.train fields the optimizer and schedule depend on, as a hashable tuple of pairs
    (a jit-cache key: runs with the same settings share compiled programs)."""
    fields = ["optimizer", "learning_rate", "schedule", "warmup_steps", "weight_decay", "weight_decay_steps",
              "grad_clip", "adam_b1", "adam_b2"] + (["num_steps"] if t["schedule"] == "cosine" else [])
    return tuple((f, t[f]) for f in fields)


def _fields(t):
    """config.train (a ConfigDict) or a dict of optimizer_settings -> attribute access."""
    return ml_collections.ConfigDict(dict(t)) if isinstance(t, dict) else t


def make_schedule(t) -> optax.Schedule:
    """config.train (or a dict of its optimizer settings) -> step -> learning rate."""
    t = _fields(t)
    if t.schedule == "rsqrt":
        peak, warmup = float(t.learning_rate), float(t.warmup_steps)

        # Constant lr / sqrt(warmup) during warm-up, then inverse square-root decay (Trax's
        # `constant * rsqrt_decay`). optax counts steps from 0, the reference from 1.
        def rsqrt(step):
            return peak * jnp.reciprocal(jnp.sqrt(jnp.maximum(step + 1.0, warmup)))

        return rsqrt
    if t.schedule == "cosine":
        warmup = min(int(t.warmup_steps), max(int(t.num_steps) - 1, 1))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=float(t.learning_rate), warmup_steps=warmup,
            decay_steps=max(int(t.num_steps), warmup + 1), end_value=0.1 * float(t.learning_rate))
    raise ValueError(f"config.train.schedule: unknown {t.schedule!r}. Fix: use rsqrt | cosine.")


def make_weight_decay_schedule(t) -> optax.Schedule:
    """config.train (or a dict of its optimizer settings) -> optax count -> Adafactor's decoupled decay
    rate: trax's `weight_decay_rate * max(n - step, 0) / n` (n = weight_decay_steps; 0: constant) at
    the reference's step = count + 1 (its first update is step 1). docs/semantics.md §5c."""
    t = _fields(t)
    rate, n = float(t.weight_decay), int(t.weight_decay_steps)
    if n < 1:
        return lambda count: jnp.full((), rate, jnp.float32)
    return lambda count: rate * jnp.maximum(n - (count + 1.0), 0.0) / n


def make_optimizer(t, param_axes=None) -> optax.GradientTransformation:
    """config.train (or a dict of its optimizer settings) -> an optax transformation (learning rate
    schedule included). `param_axes`: the params' logical axes (state.model_spec(m).axes), which
    Adafactor's factoring reads (adafactor.py); init and update must get the same."""
    t = _fields(t)
    schedule = make_schedule(t)
    if t.optimizer == "adafactor":
        # trax's Adafactor.update, step by step (docs/semantics.md §5c): y = g / sqrt(V_hat), clipped to
        # RMS <= clipping_threshold, times lr and max(RMS(w), 1e-3); w <- (1 - wd) w - that, the decay
        # not multiplied by the learning rate.
        chain = [scale_by_factored_rms(param_axes, decay_rate=0.8, epsilon1=1e-16)]
        if t.grad_clip > 0:
            chain.append(optax.clip_by_block_rms(float(t.grad_clip)))
        chain += [optax.scale_by_learning_rate(schedule, flip_sign=False),
                  optax.scale_by_param_block_rms(min_scale=1e-3)]
        if t.weight_decay > 0:
            chain.append(optax.add_decayed_weights(make_weight_decay_schedule(t)))
        chain.append(optax.scale(-1.0))
        return optax.chain(*chain)
    if t.optimizer == "adamw":
        # AdamW's usual convention (Loshchilov & Hutter as in optax): the decay is multiplied by
        # the scheduled learning rate, so e.g. weight_decay 0.1 with learning_rate 3e-4. Constant:
        # weight_decay_steps is Adafactor's (the reference's) schedule only.
        chain = [optax.clip_by_global_norm(float(t.grad_clip))] if t.grad_clip > 0 else []
        chain.append(optax.adamw(schedule, b1=float(t.adam_b1), b2=float(t.adam_b2), weight_decay=float(t.weight_decay)))
        return optax.chain(*chain)
    raise ValueError(f"config.train.optimizer: unknown {t.optimizer!r}. Fix: use adafactor | adamw.")
