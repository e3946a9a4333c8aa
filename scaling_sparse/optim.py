"""Optimizers and learning-rate schedules (optax), built from `config.train`.

The reference (docs/semantics.md §5) trains with Adafactor: no momentum (beta1 0), second-moment decay
exponent 0.8, update clipping 1.0, factored second moments, parameter scaling, decoupled weight
decay 1e-5, and learning rate `1 / sqrt(max(step, warmup))`. AdamW and warmup + cosine are options.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def optimizer_settings(t) -> tuple:
    """The config.train fields the optimizer and schedule depend on, as a hashable tuple of pairs
    (a jit-cache key: runs with the same settings share compiled programs)."""
    fields = ["optimizer", "learning_rate", "schedule", "warmup_steps", "weight_decay", "grad_clip",
              "adam_b1", "adam_b2"] + (["num_steps"] if t["schedule"] == "cosine" else [])
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


def make_optimizer(t) -> optax.GradientTransformation:
    """config.train (or a dict of its optimizer settings) -> an optax transformation (learning rate
    schedule included)."""
    t = _fields(t)
    schedule = make_schedule(t)
    if t.optimizer == "adafactor":
        # optax.adafactor applies the weight decay after the learning-rate scaling, so it is
        # decoupled (w <- w - lr * u - wd * w), as in Trax. Its clipping is Adafactor's
        # per-parameter update-RMS clipping, the reference's `clipping_threshold`.
        return optax.adafactor(
            learning_rate=schedule,
            factored=True,
            decay_rate=0.8,
            clipping_threshold=float(t.grad_clip) if t.grad_clip > 0 else None,
            momentum=None,
            multiply_by_parameter_scale=True,
            weight_decay_rate=float(t.weight_decay) if t.weight_decay > 0 else None,
        )
    if t.optimizer == "adamw":
        # AdamW's usual convention (Loshchilov & Hutter as in optax): the decay is multiplied by
        # the scheduled learning rate, so e.g. weight_decay 0.1 with learning_rate 3e-4.
        chain = [optax.clip_by_global_norm(float(t.grad_clip))] if t.grad_clip > 0 else []
        chain.append(optax.adamw(schedule, b1=float(t.adam_b1), b2=float(t.adam_b2), weight_decay=float(t.weight_decay)))
        return optax.chain(*chain)
    raise ValueError(f"config.train.optimizer: unknown {t.optimizer!r}. Fix: use adafactor | adamw.")
