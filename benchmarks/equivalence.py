"""One training step on a device mesh against the same step on one device: the shared core of
tests/sharded_equivalence.py (8 virtual CPU devices) and benchmarks/accelerator_check.py (the devices
present). Every figure is returned; the callers decide the tolerances."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from scaling_sparse import sharding
from scaling_sparse.config import load_config, validate
from scaling_sparse.state import init_train_state
from scaling_sparse.train import global_batch, make_train_step, weighted_cross_entropy
from scaling_sparse.variants import SPARSE_ALL

MODELS = {
    "dense": {},
    "sparse_all": SPARSE_ALL,
    "terraformer": dict(reversible=True, attention="lsh", lsh_chunk_len=8, lsh_n_hashes=2, ff_sru_units=8,
                        **SPARSE_ALL, n_layers=1),
    # The encoder-decoders (span-corruption batches): sparse, and the reference's C4 Terraformer.
    "encdec": dict(arch="encdec", n_encoder_layers=1, **SPARSE_ALL),
    "terraformer_encdec": dict(arch="encdec", reversible=True, n_encoder_layers=1, n_layers=1, ff_sru_units=8,
                               **SPARSE_ALL),
    # A compressed dense model (docs/compression.md): factor pairs in a CoFi-pruned shape.
    "compressed": dict(d_model=24, d_head=8, layer_heads=(3, 2), layer_d_ff=(0, 40), factor_rank_attn=4,
                       factor_rank_ff=8),
}


def config_of(model: dict, mesh: dict, dtype: str = "float32"):
    config = load_config("tiny")
    config.model.update(model)
    config.model.dtype = dtype
    config.train.update(batch_size=8, seq_len=16, inputs_len=12)
    if model.get("arch") == "encdec":
        config.data.objective = "span_corruption"
    config.mesh.update(mesh)
    return validate(config)


def batch_of(config, seed=0):
    rng = np.random.RandomState(seed)
    w = rng.randint(2, config.model.vocab_size, size=(config.train.batch_size, config.train.seq_len + 1))
    batch = {"inputs": w[:, :-1].astype(np.int32), "targets": w[:, 1:].astype(np.int32),
             "weights": np.ones((config.train.batch_size, config.train.seq_len), np.float32)}
    if config.model.arch == "encdec":  # the span-corruption layout (data/pipeline.py), encoder rows padded
        inputs = rng.randint(2, config.model.vocab_size, size=(config.train.batch_size, config.train.inputs_len))
        inputs[::2, -3:] = 0
        batch.update(inputs=inputs.astype(np.int32), decoder_inputs=w[:, :-1].astype(np.int32))
    return batch


def gradients(layout, state, batch):
    """The first train step's gradients (same key as the step: fold_in(rng, 0))."""

    def loss(params):
        with sharding.activation_rules(layout.mesh, layout.rules):  # as the train step traces it
            logits = nnx.merge(layout.graphdef, params).logits(batch, mode="train",
                                                               rng=jax.random.fold_in(state["rng"], 0))
        return weighted_cross_entropy(logits, batch["targets"], batch["weights"])[0]

    return jax.device_get(jax.jit(jax.grad(loss))(state["params"]))


def one_step(config, mesh):
    layout, state = init_train_state(config, mesh)
    rules = sharding.logical_rules(config.mesh)
    per_device = {k: sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state[k]))
                  for k in ("params", "opt_state")}
    total = {k: sum(leaf.nbytes for leaf in jax.tree.leaves(state[k])) for k in ("params", "opt_state")}
    batch = global_batch(batch_of(config), mesh, rules)
    grads = gradients(layout, state, batch)
    state, metrics = make_train_step(layout, config.train)(state, batch)
    return layout, state, float(metrics["loss"]), per_device, total, grads


def max_update_diff(a, b, ref_grads) -> float:
    """Largest difference of updated parameters where the gradient is not numerically zero: a
    normalising optimizer (Adafactor, Adam) turns a zero gradient's float noise (e.g. the key bias,
    which softmax ignores) into a full-size step of either sign, on any layout."""
    diffs = [np.abs(np.asarray(x) - np.asarray(y))[np.abs(np.asarray(g)) > 1e-6]
             for x, y, g in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(ref_grads))]
    return float(max((d.max() for d in diffs if d.size), default=0.0))


def max_diff(a, b) -> float:
    return float(max(np.max(np.abs(np.asarray(x) - np.asarray(y))) for x, y in zip(jax.tree.leaves(a),
                                                                                    jax.tree.leaves(b))))


def compare_step(model: dict, mesh_fields: dict, reference=None, dtype: str = "float32") -> tuple[dict, tuple, dict]:
    """One train step of `model` on the mesh `mesh_fields` against one device -> (figures, reference,
    the mesh's new state); pass the reference back in to reuse it for the next mesh."""
    if reference is None:
        _, ref_state, ref_loss, _, _, ref_grads = one_step(config_of(model, dict(data=1, fsdp=1, tensor=1), dtype),
                                                           sharding.single_device_mesh())
        reference = (jax.device_get(ref_state["params"]), ref_loss, ref_grads)
    ref_params, ref_loss, ref_grads = reference
    config = config_of(model, mesh_fields, dtype)
    _, state, loss, per_device, total, grads = one_step(config, sharding.make_mesh(config.mesh))
    return {"loss": loss, "ref_loss": ref_loss, "max_grad_diff": max_diff(grads, ref_grads),
            "grad_scale": float(max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(ref_grads))),
            "max_param_diff": max_update_diff(state["params"], ref_params, ref_grads),
            "per_device_bytes": per_device, "total_bytes": total}, reference, state
