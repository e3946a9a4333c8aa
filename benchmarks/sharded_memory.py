"""Per-device train-state memory under FSDP: parameters + optimizer state of a preset on a mesh of
8 devices at fsdp = 1, 2, 4, 8 (data = 8 / fsdp), from XLA's compiled memory analysis of the state
builder's sharded init program (nothing is allocated), next to the bytes the shardings imply.

    python benchmarks/sharded_memory.py [--preset=medium_sparse_all] [--fsdp=1,2,4,8] [--devices=8]

Runs on virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count, set here before JAX
starts) unless real accelerators are present. Writes benchmarks/results/sharded_memory_<platform>.json
and .png. How the figures are measured: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="medium_sparse_all")
    p.add_argument("--fsdp", default="1,2,4,8", help="comma-separated fsdp sizes; data = devices / fsdp")
    p.add_argument("--devices", type=int, default=8, help="virtual CPU devices (ignored on GPU/TPU)")
    p.add_argument("--optimizer", default=None, help="override config.train.optimizer (adafactor | adamw)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no_plot", action="store_true")
    args = p.parse_args(argv)
    try:
        args.fsdp = [int(f) for f in args.fsdp.split(",")]
    except ValueError:
        p.error(f"--fsdp must be comma-separated integers, got {args.fsdp!r}")
    if any(f < 1 or args.devices % f for f in args.fsdp):
        p.error(f"every --fsdp size must divide --devices={args.devices}, got {args.fsdp}")
    return args


def measure(preset: str, fsdp_sizes, optimizer=None) -> list[dict]:
    import jax
    import numpy as np

    from scaling_sparse import sharding
    from scaling_sparse.config import load_config
    from scaling_sparse.state import train_state_program

    rows = []
    n = jax.device_count()
    for fsdp in fsdp_sizes:
        config = load_config(preset)
        if optimizer:
            config.train.optimizer = optimizer
        config.mesh.update(data=n // fsdp, fsdp=fsdp, tensor=1)
        mesh = sharding.make_mesh(config.mesh)
        start = time.perf_counter()
        layout, program = train_state_program(config, mesh)
        analysis = program.lower().compile().memory_analysis()

        def implied(tree):  # bytes of one device's shard of every leaf
            return int(sum(np.prod(s.sharding.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
                           for s in jax.tree.leaves(tree)))

        def total(tree):
            return int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(tree)))

        rows.append({
            "fsdp": fsdp, "data": n // fsdp, "devices": n,
            "compiled_output_bytes_per_device": int(analysis.output_size_in_bytes),
            "compiled_temp_bytes_per_device": int(analysis.temp_size_in_bytes),
            "param_bytes_per_device": implied(layout.abstract["params"]),
            "opt_state_bytes_per_device": implied(layout.abstract["opt_state"]),
            "param_bytes_total": total(layout.abstract["params"]),
            "opt_state_bytes_total": total(layout.abstract["opt_state"]),
            "compile_s": round(time.perf_counter() - start, 2),
        })
    return rows


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fsdp = [r["fsdp"] for r in rows]
    gib = 2 ** 30
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([str(f) for f in fsdp], [r["param_bytes_per_device"] / gib for r in rows], label="parameters")
    ax.bar([str(f) for f in fsdp], [r["opt_state_bytes_per_device"] / gib for r in rows],
           bottom=[r["param_bytes_per_device"] / gib for r in rows], label="optimizer state")
    ax.plot([str(f) for f in fsdp], [r["compiled_output_bytes_per_device"] / gib for r in rows], "ko-",
            label="XLA compiled output / device")
    ax.set_xlabel("fsdp (data = devices / fsdp)")
    ax.set_ylabel("GiB per device")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    sys.path.insert(0, str(ROOT))
    import flax
    import jax

    rows = measure(args.preset, args.fsdp, args.optimizer)
    print(f"{args.preset}: per-device train state on {rows[0]['devices']} {jax.devices()[0].platform} devices")
    print(f"{'fsdp':>5}{'data':>6}{'params MiB':>12}{'opt MiB':>10}{'sum MiB':>10}{'XLA out MiB':>13}")
    for r in rows:
        p, o = r["param_bytes_per_device"] / 2 ** 20, r["opt_state_bytes_per_device"] / 2 ** 20
        print(f"{r['fsdp']:>5}{r['data']:>6}{p:>12.1f}{o:>10.1f}{p + o:>10.1f}"
              f"{r['compiled_output_bytes_per_device'] / 2 ** 20:>13.1f}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    platform_name = jax.devices()[0].platform
    stem = out / f"sharded_memory_{platform_name}"
    report = {"preset": args.preset, "optimizer": args.optimizer or "config default", "rows": rows,
              "machine": {"platform": platform_name, "device_count": jax.device_count(),
                          "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                          "host": platform.node(), "date": time.strftime("%Y-%m-%d")}}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plot:
        plot(rows, stem.with_suffix(".png"), f"{args.preset}: train state per device")
    print(f"wrote {stem.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
