"""Run in a subprocess with 8 virtual CPU devices (tests/test_trime.py): TRIME's loss and gradients of
one batch on sharded meshes against one device, for memory local and ext (its other rows are gathered
across the batch axes by XLA). Prints one JSON object.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/trime_sharded.py
"""

import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.equivalence import batch_of, config_of, max_diff  # noqa: E402
from scaling_sparse import sharding  # noqa: E402
from scaling_sparse.state import init_train_state  # noqa: E402
from scaling_sparse.train import _loss, global_batch, objective_settings  # noqa: E402

MESHES = {"single": None, "data=8": dict(data=8, fsdp=1, tensor=1),
          "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2)}


def loss_and_grads(memory: str, mesh_fields):
    config = config_of({"reversible": memory == "ext"}, mesh_fields or dict(data=1, fsdp=1, tensor=1))
    config.train.objective = "trime"
    config.train.trime.update(memory=memory, ce_warmup_fraction=0.0, hide_own_probability=0.5)
    mesh = sharding.single_device_mesh() if mesh_fields is None else sharding.make_mesh(config.mesh)
    layout, state = init_train_state(config, mesh)
    rules = sharding.logical_rules(config.mesh)
    batch = batch_of(config)
    batch["weights"][1, -3:] = 0  # padding: entries that must not be visible
    batch = global_batch(batch, mesh, rules)
    objective = objective_settings(config.train)

    def loss(params):
        with sharding.activation_rules(layout.mesh, layout.rules):
            loss_sum, weight_sum, used = _loss(nnx.merge(layout.graphdef, params), batch, jax.random.PRNGKey(3),
                                               jax.numpy.int32(1), objective)
        return loss_sum / weight_sum, used

    (value, used), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state["params"])
    return float(value), float(used), jax.device_get(grads)


def main() -> None:
    report = {"devices": jax.device_count()}
    for memory in ("local", "ext"):
        ref_loss, used, ref_grads = loss_and_grads(memory, None)
        scale = float(max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(ref_grads)))
        for name, fields in MESHES.items():
            if fields is None:
                continue
            loss, _, grads = loss_and_grads(memory, fields)
            report[f"{memory}/{name}"] = {"loss": loss, "ref_loss": ref_loss, "used_trime": used,
                                         "max_grad_diff": max_diff(grads, ref_grads), "grad_scale": scale}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
