"""Run in a subprocess with 8 virtual CPU devices (tests/test_sharding.py): sharded paths against
the unsharded ones, for one model per run (a run stays within the test's timeout on two busy cores).
Prints one JSON object with every measured figure; the test asserts on it.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_equivalence.py OUT_DIR MODEL
"""

import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from scaling_sparse import sharding  # noqa: E402
from scaling_sparse.checkpoint import Checkpointer  # noqa: E402
from scaling_sparse.config import load_config, validate  # noqa: E402
from scaling_sparse.decode import Decoder  # noqa: E402
from scaling_sparse.state import init_train_state, restore_params, restore_train_state  # noqa: E402
from scaling_sparse.train import global_batch, make_train_step, weighted_cross_entropy  # noqa: E402

MODELS = {
    "dense": {},
    "sparse_all": dict(ff_sparsity=8, attn_sparsity=4, loss_sparsity=4),
    "terraformer": dict(reversible=True, attention="lsh", lsh_chunk_len=8, lsh_n_hashes=2, ff_sru_units=8,
                        ff_sparsity=8, attn_sparsity=4, loss_sparsity=4, n_layers=1),
    # The encoder-decoders (span-corruption batches): sparse, and the reference's C4 Terraformer.
    "encdec": dict(arch="encdec", n_encoder_layers=1, ff_sparsity=8, attn_sparsity=4, loss_sparsity=4),
    "terraformer_encdec": dict(arch="encdec", reversible=True, n_encoder_layers=1, n_layers=1, ff_sru_units=8,
                               ff_sparsity=8, attn_sparsity=4, loss_sparsity=4),
    # A compressed dense model (docs/compression.md): factor pairs in a CoFi-pruned shape.
    "compressed": dict(d_model=24, d_head=8, layer_heads=(3, 2), layer_d_ff=(0, 40), factor_rank_attn=4,
                       factor_rank_ff=8),
}
MESHES = {
    "data=8": dict(data=8, fsdp=1, tensor=1),
    "fsdp=8": dict(data=1, fsdp=8, tensor=1),
    "tensor=2,fsdp=4": dict(data=1, fsdp=4, tensor=2),
    "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2),
}


def config_of(model: dict, mesh: dict):
    config = load_config("tiny")
    config.model.update(model)
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


def main(out_dir: str, name: str) -> None:
    if name not in MODELS:
        sys.exit(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    out_dir = pathlib.Path(out_dir)
    report = {"devices": jax.device_count(), "steps": {}, "checkpoint": {}, "decode": {}}
    single = sharding.single_device_mesh()
    model = MODELS[name]
    config = config_of(model, dict(data=1, fsdp=1, tensor=1))
    _, ref_state, ref_loss, _, _, ref_grads = one_step(config, single)
    ref_params = jax.device_get(ref_state["params"])
    for mesh_name, mesh_fields in MESHES.items():
        config = config_of(model, mesh_fields)
        mesh = sharding.make_mesh(config.mesh)
        layout, state, loss, per_device, total, grads = one_step(config, mesh)
        report["steps"][f"{name}/{mesh_name}"] = {
            "loss": loss, "ref_loss": ref_loss, "max_grad_diff": max_diff(grads, ref_grads),
            "grad_scale": float(max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(ref_grads))),
            "max_param_diff": max_update_diff(state["params"], ref_params, ref_grads),
            "per_device_bytes": per_device, "total_bytes": total}
        if name == "sparse_all" and mesh_name == "fsdp=8":
            # Saved on fsdp=8, restored on 2x2x2 and on one device: the same values.
            with Checkpointer(out_dir / "ckpt") as ckpt:
                ckpt.save(1, state, {})
            saved = jax.device_get(state)
            for target_name, target in (("data=2,fsdp=2,tensor=2", MESHES["data=2,fsdp=2,tensor=2"]),
                                        ("single", None)):
                target_config = config_of(model, target or dict(data=1, fsdp=1, tensor=1))
                target_mesh = single if target is None else sharding.make_mesh(target_config.mesh)
                with Checkpointer(out_dir / "ckpt", read_only=True) as ckpt:
                    target_layout, restored, _, _ = restore_train_state(target_config, target_mesh, ckpt)
                    _, params_only, step = restore_params(target_config, target_mesh, ckpt)
                embed = restored["params"]["token_embed"]
                report["checkpoint"][target_name] = {
                    "max_diff": max_diff(restored, saved), "params_only_diff": max_diff(params_only, saved["params"]),
                    "step": step, "sharding_matches": all(
                        leaf.sharding == want for leaf, want in zip(
                            jax.tree.leaves(restored["params"]), jax.tree.leaves(target_layout.param_shardings))),
                    "embed_shards": len({str(s.index) for s in embed.addressable_shards})}
    # Decoding on a tensor-parallel x fsdp mesh gives the unsharded model's tokens.
    config = config_of(model, MESHES["tensor=2,fsdp=4"])
    mesh = sharding.make_mesh(config.mesh)
    decode_layout, sharded_state = init_train_state(config, mesh)
    _, single_state = init_train_state(config_of(model, dict(data=1, fsdp=1, tensor=1)), single)
    prompt = batch_of(config, seed=3)["inputs"][1:3, :5]  # unpadded rows
    tokens = {}
    for label, params, m in (("sharded", sharded_state["params"], mesh), ("single", single_state["params"], single)):
        decoder = Decoder(decode_layout.graphdef, params, max_len=config.model.max_len, mesh=m)
        tokens[label] = decoder.generate(prompt, 8).tolist()
    report["decode"][name] = tokens
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
