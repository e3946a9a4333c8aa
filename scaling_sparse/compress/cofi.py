"""CoFi structured pruning with distillation (Xia, Zhong, Chen 2022, "Structured Pruning Learns
Compact and Accurate Models", ACL, arXiv:2204.00408; docs/compression.md).

The student is the trained dense model with hard-concrete (L0) masks (hard_concrete.py) on coarse
units (whole attention and FFN sub-layers) and fine ones (heads, FFN units, hidden dimensions),
trained jointly with its weights for `steps` steps on
    loss = KL(teacher || student) on the logits at temperature T (times T^2)
         + LAYER_WEIGHT * layer distillation (teacher layer i against student layer m(i) through a learned
           [d, d] map, m(i) the student layer closest to it; CoFi's dynamic layer mapping)
         + lambda1 (s - t) + lambda2 (s - t)^2
where s is the expected sparsity of the prunable (attention and FFN) parameters under the masks and
the target t rises linearly from 0 to `target_sparsity` over the first half of the steps; the
Lagrange multipliers lambda1, lambda2 are trained by gradient ascent, which drives s to t. Then the
masks are made deterministic (CoFi's eval-time masks), their values folded into the weights, and
every zeroed head, unit, sub-layer and hidden dimension is removed: an ordinary, smaller model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scaling_sparse.compress import hard_concrete as hc
from scaling_sparse.compress import masked_forward as mf
from scaling_sparse.compress import workdir as wd

MASKS = ("head", "attn", "int", "ffn", "hidden")
TEMPERATURE = 2.0        # prediction distillation temperature (CoFi's distill_temp)
LAYER_WEIGHT = 1.0       # weight of the layer distillation loss (relative MSE, see _layer_loss)
DROPRATE_INIT = 0.1      # initial drop probability of every mask (CoFi: 0.5; see docs/compression.md)
LR_WEIGHTS = 3e-4        # Adam on the student's weights and the layer map
LR_MASKS = 0.1           # Adam on log_alpha (CoFi's reg_learning_rate is of this order), b1 below
MASK_B1 = 0.5            # less momentum than Adam's 0.9: the masks follow the multipliers without overshooting
LR_LAMBDAS = 1.0         # plain gradient ascent on the Lagrange multipliers (no momentum, see make_optimizer)


def mask_shapes(m) -> dict:
    return {"head": (m.n_layers, m.n_heads), "attn": (m.n_layers,), "int": (m.n_layers, m.d_ff),
            "ffn": (m.n_layers,), "hidden": (m.d_model,)}


def full_size(m) -> float:
    """The prunable parameters: every attention (4 d H dh) and FFN (2 d f) matrix."""
    return m.n_layers * (4 * m.d_model * m.n_heads * m.head_dim + 2 * m.d_model * m.d_ff)


def expected_size(log_alpha: dict, m):
    """CoFi's expected number of prunable parameters: sum over layers of
    E[z_attn] sum_h E[z_head] * 4 dh + E[z_ffn] sum_u E[z_int] * 2, times sum_j E[z_hidden_j]."""
    p = {k: hc.prob_nonzero(v) for k, v in log_alpha.items()}
    hidden = p["hidden"].sum()
    heads = (p["attn"][:, None] * p["head"]).sum() * 4 * m.head_dim
    units = (p["ffn"][:, None] * p["int"]).sum() * 2
    return hidden * (heads + units)


def expected_sparsity(log_alpha: dict, m):
    return 1.0 - expected_size(log_alpha, m) / full_size(m)


def size_of_masks(z: dict, m) -> float:
    """The prunable parameters a set of deterministic masks keeps (what pruning leaves)."""
    nz = {k: np.asarray(v) != 0 for k, v in z.items()}
    hidden = nz["hidden"].sum()
    heads = (nz["attn"][:, None] & nz["head"]).sum() * 4 * m.head_dim
    units = (nz["ffn"][:, None] & nz["int"]).sum() * 2
    return float(hidden * (heads + units))


def deterministic_masks(log_alpha: dict) -> dict:
    """Eval-time masks: heads and FFN units per layer, the sub-layer gates of all layers and the
    hidden dimensions each as one group (hard_concrete.deterministic; CoFi decides each layer's
    sub-layer gates on its own, docs/compression.md). A layer whose heads (units) are all zero gets its
    attention (FFN) gate zero too: pruning removes that sub-layer with its output bias, and the masked
    model must do the same."""
    out = {}
    for name, value in log_alpha.items():
        value = np.asarray(value)
        out[name] = (np.stack([hc.deterministic(row) for row in value]) if name in ("head", "int")
                     else hc.deterministic(value))
    for gate, units in (("attn", "head"), ("ffn", "int")):
        out[gate] = np.where((out[units] != 0).any(axis=1), out[gate], 0.0).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- the objective

def _kl(teacher_logits, student_logits, weights):
    t = TEMPERATURE
    log_p = jax.nn.log_softmax(teacher_logits / t)
    log_q = jax.nn.log_softmax(student_logits / t)
    kl = (jnp.exp(log_p) * (log_p - log_q)).sum(-1) * t * t
    return (kl * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _layer_loss(student_hidden, teacher_hidden, layer_map):
    """Each teacher layer against its closest student layer (after the learned map), as a relative
    MSE (divided by the teacher layer's mean square, so the weight does not depend on the stream's
    scale); the mapping m(i) is chosen without gradient (CoFi's dynamic layer mapping)."""
    mapped = student_hidden @ layer_map                                   # [L, b, t, d]
    diff = mapped[None, :] - teacher_hidden[:, None]                      # [L_teacher, L_student, ...]
    mse = jnp.square(diff).mean(axis=(2, 3, 4))
    mse = mse / jnp.square(teacher_hidden).mean(axis=(1, 2, 3))[:, None]
    choice = jnp.argmin(jax.lax.stop_gradient(mse), axis=1)
    return jnp.take_along_axis(mse, choice[:, None], axis=1).mean(), choice


def make_step(m, tx):
    """The jitted pruning step. The teacher's weights are an argument: closed over, jit would bake
    every array into the program as a constant."""
    def loss_fn(trainable, teacher_params, batch, key, target):
        params, log_alpha, layer_map, lambdas = (trainable["params"], trainable["log_alpha"],
                                                 trainable["layer_map"], trainable["lambdas"])
        keys = jax.random.split(key, len(MASKS))
        z = {name: hc.sample(log_alpha[name], k) for name, k in zip(MASKS, keys)}
        teacher_logits, teacher_hidden = mf.forward(teacher_params, batch["inputs"], mf.full_masks(m), m)
        teacher_logits, teacher_hidden = jax.lax.stop_gradient((teacher_logits, teacher_hidden))
        logits, hidden = mf.forward(params, batch["inputs"], z, m)
        pred = _kl(teacher_logits, logits, batch["weights"])
        layer, choice = _layer_loss(hidden, teacher_hidden, layer_map)
        s = expected_sparsity(log_alpha, m)
        lagrangian = lambdas[0] * (s - target) + lambdas[1] * jnp.square(s - target)
        return pred + LAYER_WEIGHT * layer + lagrangian, {
            "loss": pred + LAYER_WEIGHT * layer, "distill_pred": pred, "distill_layer": layer,
            "lagrangian": lagrangian, "expected_sparsity": s, "target": target, "layer_choice": choice}

    @jax.jit
    def step(trainable, opt_state, teacher_params, batch, key, target):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(trainable, teacher_params, batch, key, target)
        grads["lambdas"] = -grads["lambdas"]  # ascent: the multipliers maximise the Lagrangian
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, metrics

    return step


def make_optimizer() -> optax.GradientTransformation:
    labels = {"params": "weights", "layer_map": "weights", "log_alpha": "masks", "lambdas": "lambdas"}
    # The multipliers integrate the constraint gap (s - t); with momentum on them too (CoFi's AdamW)
    # the expected sparsity overshot the target to 0.8 for 0.5 in a 100-step stdlib run, so they take
    # plain steps and the masks a shorter momentum.
    return optax.multi_transform({"weights": optax.adam(LR_WEIGHTS), "masks": optax.adam(LR_MASKS, b1=MASK_B1),
                                  "lambdas": optax.sgd(LR_LAMBDAS)},
                                 lambda tree: {k: jax.tree.map(lambda _: labels[k], v) for k, v in tree.items()})


def init_trainable(params: dict, m) -> dict:
    return {"params": params,
            "log_alpha": {k: jnp.asarray(hc.init_log_alpha(s, DROPRATE_INIT)) for k, s in mask_shapes(m).items()},
            "layer_map": jnp.eye(m.d_model, dtype=jnp.float32), "lambdas": jnp.zeros((2,), jnp.float32)}


def target_at(step: int, steps: int, target_sparsity: float) -> float:
    """The Lagrangian's target: linear from 0 to the final one over the first half of the steps."""
    warmup = max(1, steps // 2)
    return target_sparsity * min(1.0, step / warmup)


# ----------------------------------------------------------------------------- pruning

def prune(params: dict, z: dict, m) -> tuple[dict, dict]:
    """Folds the (deterministic) masks into the weights and drops everything they zero
    -> (pruned params, the new model's shape fields). The pruned model's logits equal
    masked_forward.forward(params, tokens, z, m)."""
    p = jax.tree.map(np.asarray, params)
    z = {k: np.asarray(v, np.float32) for k, v in z.items()}
    kept = np.flatnonzero(z["hidden"])
    if kept.size == 0:
        raise ValueError("every hidden dimension is pruned: lower the target sparsity")
    zh, dh = z["hidden"], m.head_dim
    out = {"token_embed": (p["token_embed"] * zh)[:, kept], "pos_embed": (p["pos_embed"] * zh)[:, kept],
           "final_norm": {k: v[kept] for k, v in p["final_norm"].items()},
           "output": {"kernel": p["output"]["kernel"][kept], "bias": p["output"]["bias"]}}
    blocks, heads, widths = {}, [], []
    for i in range(m.n_layers):
        b, nb = p["stack"]["blocks"][i], {}
        head_keep = np.flatnonzero(z["head"][i]) if z["attn"][i] != 0 else np.array([], int)
        if head_keep.size:
            cols = (head_keep[:, None] * dh + np.arange(dh)).reshape(-1)
            qkv = {name: {"kernel": b["attn"]["qkv"][name]["kernel"][kept][:, cols],
                          "bias": b["attn"]["qkv"][name]["bias"][cols]} for name in ("q", "k", "v")}
            row_scale = np.repeat(z["head"][i], dh)[:, None] * z["attn"][i]
            out_kernel = (b["attn"]["out"]["kernel"] * row_scale * zh[None, :])[cols][:, kept]
            out_bias = (b["attn"]["out"]["bias"] * z["attn"][i] * zh)[kept]
            nb["attn"] = {"qkv": qkv, "out": {"kernel": out_kernel, "bias": out_bias}}
            nb["attn_norm"] = {k: v[kept] for k, v in b["attn_norm"].items()}
        unit_keep = np.flatnonzero(z["int"][i]) if z["ffn"][i] != 0 else np.array([], int)
        if unit_keep.size:
            w_in = {"kernel": b["ffn"]["w_in"]["kernel"][kept][:, unit_keep], "bias": b["ffn"]["w_in"]["bias"][unit_keep]}
            scale = z["int"][i][:, None] * z["ffn"][i] * zh[None, :]
            w_out = {"kernel": (b["ffn"]["w_out"]["kernel"] * scale)[unit_keep][:, kept],
                     "bias": (b["ffn"]["w_out"]["bias"] * z["ffn"][i] * zh)[kept]}
            nb["ffn"] = {"w_in": w_in, "w_out": w_out}
            nb["ffn_norm"] = {k: v[kept] for k, v in b["ffn_norm"].items()}
        if nb:  # a layer with neither sub-layer holds no parameters at all
            blocks[i] = nb
        heads.append(int(head_keep.size))
        widths.append(int(unit_keep.size))
    out["stack"] = {"blocks": blocks}
    out = jax.tree.map(lambda a: np.asarray(a, np.float32), out)
    shape = {"d_model": int(kept.size), "d_head": dh, "layer_heads": tuple(heads), "layer_d_ff": tuple(widths)}
    return out, shape


# ----------------------------------------------------------------------------- the command

def compress_cofi(config, workdir, out, *, target_sparsity: float, steps: int, step: int | None = None,
                  echo=print) -> dict:
    from tqdm import tqdm

    from scaling_sparse.train import load_data

    m = wd.check_dense_source(config)
    wd.check_out(workdir, out)
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
    _, teacher, source_step, data_state = wd.load_teacher(config, workdir, step=step)
    teacher = jax.tree.map(jnp.asarray, teacher)
    data = load_data(config, workdir)
    if data_state:
        data.train.set_state(data_state)  # continue the teacher's training stream
    tx = make_optimizer()
    trainable = init_trainable(teacher, m)
    opt_state = tx.init(trainable)
    train_step = make_step(m, tx)
    key = jax.random.PRNGKey(int(config.train.seed) + 17)
    log_every = max(1, steps // 10)
    history = []
    bar = tqdm(total=steps, desc=f"cofi to {target_sparsity:.0%}", disable=not config.train.progress)
    for i in range(1, steps + 1):
        batch = {k: jnp.asarray(v) for k, v in next(data.train).items()}
        target = target_at(i, steps, target_sparsity)
        trainable, opt_state, metrics = train_step(trainable, opt_state, teacher, batch,
                                                   jax.random.fold_in(key, i), jnp.float32(target))
        bar.update(1)
        if i % log_every == 0 or i == steps:
            row = {k: float(v) for k, v in metrics.items() if k != "layer_choice"}
            row.update(step=i, layer_choice=[int(c) for c in metrics["layer_choice"]])
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"cofi: the loss is {row['loss']} at step {i}; nothing was written. Fix: "
                                         "fewer --steps or a lower --target_sparsity")
            history.append(row)
            (bar.write if not bar.disable else echo)(
                f"cofi step {i} | distill pred {row['distill_pred']:.4f} | layer {row['distill_layer']:.4f} | "
                f"expected sparsity {row['expected_sparsity']:.3f} (target {row['target']:.3f})")
    bar.close()
    z = deterministic_masks(jax.device_get(trainable["log_alpha"]))
    pruned, shape = prune(jax.device_get(trainable["params"]), z, m)
    new_config = wd.derived_config(config, **shape)
    achieved = 1.0 - size_of_masks(z, m) / full_size(m)
    before, after = wd.parameter_counts(config), wd.parameter_counts(new_config)
    summary = {"method": "cofi", "target_sparsity": target_sparsity, "achieved_sparsity": achieved,
               "steps": steps, "extra_steps": steps, "source_workdir": str(workdir), "source_step": source_step,
               "kept": {"hidden": shape["d_model"], "heads": list(shape["layer_heads"]),
                        "ffn_units": list(shape["layer_d_ff"])},
               "final": history[-1] if history else {}, "history": history,
               "settings": {"temperature": TEMPERATURE, "layer_weight": LAYER_WEIGHT, "droprate_init": DROPRATE_INIT,
                            "lr_weights": LR_WEIGHTS, "lr_masks": LR_MASKS, "mask_b1": MASK_B1,
                            "lr_lambdas": LR_LAMBDAS},
               "total_before": before["total"], "total_after": after["total"],
               "per_token_before": before["per_token"], "per_token_after": after["per_token"], "out": str(out)}
    echo(f"cofi: kept {shape['d_model']}/{m.d_model} hidden dims, heads {list(shape['layer_heads'])}, FFN units "
         f"{list(shape['layer_d_ff'])}; sparsity of the prunable parameters {achieved:.3f} (target {target_sparsity})")
    wd.write_model(new_config, pruned, workdir, out, step=source_step + steps, data_state=data.train.get_state(),
                   provenance=summary, echo=echo)
    return summary
