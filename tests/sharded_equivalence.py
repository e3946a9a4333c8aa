"""Run in a subprocess with 8 virtual CPU devices (tests/test_sharding.py): sharded paths against
the unsharded ones, for one model per run (a run stays within the test's timeout on two busy cores).
Prints one JSON object with every measured figure; the test asserts on it.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_equivalence.py OUT_DIR MODEL
"""

import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.equivalence import MODELS, batch_of, compare_step, config_of, max_diff  # noqa: E402
from scaling_sparse import sharding  # noqa: E402
from scaling_sparse.checkpoint import Checkpointer  # noqa: E402
from scaling_sparse.decode import Decoder  # noqa: E402
from scaling_sparse.state import convert_weights, init_train_state, restore_params, restore_train_state  # noqa: E402

MESHES = {
    "data=8": dict(data=8, fsdp=1, tensor=1),
    "fsdp=8": dict(data=1, fsdp=8, tensor=1),
    "tensor=2,fsdp=4": dict(data=1, fsdp=4, tensor=2),
    "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2),
}
# int8 weights decoded sharded (each ~20 s more): the two models with every layer kind between them.
INT8_MODELS = ("sparse_all", "terraformer_encdec")


def main(out_dir: str, name: str) -> None:
    if name not in MODELS:
        sys.exit(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    out_dir = pathlib.Path(out_dir)
    report = {"devices": jax.device_count(), "steps": {}, "checkpoint": {}, "decode": {}}
    single = sharding.single_device_mesh()
    model, reference = MODELS[name], None
    for mesh_name, mesh_fields in MESHES.items():
        figures, reference, state = compare_step(model, mesh_fields, reference)
        report["steps"][f"{name}/{mesh_name}"] = figures
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
    tokens, int8_tokens = {}, {}
    for label, params, m in (("sharded", sharded_state["params"], mesh), ("single", single_state["params"], single)):
        # The JAX path for both: the comparison is of the sharding (the kernels have tests of their own).
        decoder = Decoder(decode_layout.graphdef, params, max_len=config.model.max_len, mesh=m, cpu_kernels=False)
        tokens[label] = decoder.generate(prompt, 8).tolist()
        if name not in INT8_MODELS:
            continue
        # The same weights quantised to int8 on each mesh (docs/quantization.md) decode the same tokens.
        int8_graphdef, int8_params = convert_weights(config.model, params, "int8", m, sharding.logical_rules(config.mesh))
        decoder = Decoder(int8_graphdef, int8_params, max_len=config.model.max_len, mesh=m, cpu_kernels=False)
        int8_tokens[label] = decoder.generate(prompt, 8).tolist()
    report["decode"][name] = tokens
    report["decode_int8"] = {name: int8_tokens} if name in INT8_MODELS else {}
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
