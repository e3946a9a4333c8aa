"""Run in a subprocess (tests/test_cpu_kernels.py): builds the CPU kernels for AVX2 only (-mno-avx512f, the
code path of CPUs without AVX-512, e.g. AMD Zen 3) into OUT_DIR, loads that library and checks its kernels
against the pure-JAX path: the float and int8 sparse FFN, the int8 matmuls, and whole tiny models decoded
with the kernels, float and int8. Prints one JSON line.

    python tests/avx2_build_check.py OUT_DIR
"""

import json
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from scaling_sparse.kernels import build  # noqa: E402

build.FLAGS = (*build.FLAGS, "-mno-avx512f")  # also drops every AVX-512 extension
build.LIB_DIR = pathlib.Path(sys.argv[1])
library = build.build(verbose=False)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from conftest import VARIANTS, make_model, random_tokens  # noqa: E402
from scaling_sparse.decode import Decoder  # noqa: E402
from scaling_sparse.kernels import cpu  # noqa: E402
from scaling_sparse.layers.sparse_ffn import SparseFF  # noqa: E402
from scaling_sparse.quantize import quantize, quantize_model  # noqa: E402

report = {"status": cpu.status()}
try:
    disassembly = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True).stdout
    report["zmm_instructions"] = disassembly.count("%zmm")
    report["ymm_instructions"] = disassembly.count("%ymm")
except FileNotFoundError:
    report["zmm_instructions"] = report["ymm_instructions"] = None

errors = {}
rng = np.random.default_rng(0)
for rows, k, n, transposed in [(1, 1024, 300, False), (1, 200, 1000, False), (16, 576, 64, False), (4, 200, 130, True)]:
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = quantize(rng.standard_normal((n, k) if transposed else (k, n)).astype(np.float32), (1,) if transposed else (0,))
    q, scale = np.asarray(w.q, np.float64), np.asarray(w.scale, np.float64).reshape(-1)
    want = (x @ (q.T if transposed else q)) * scale
    got = np.asarray(jax.jit(lambda x: cpu.int8_matmul(x, w.q, w.scale.reshape(-1), transposed=transposed))(x))
    errors[f"int8_matmul {rows}x{k}x{n} T={transposed}"] = float(np.abs(got - want).max() / np.abs(want).max())
for weights in ("float", "int8"):
    ffn = SparseFF(48, 96, 8, lowrank=6, rngs=nnx.Rngs(1))
    ffn.c2[...] = ffn.c2[...] * 30
    if weights == "int8":
        quantize_model(ffn)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 48))
    want, _ = ffn.decode(x, {}, 0)
    call = cpu.sparse_ffn_decode_int8 if weights == "int8" else cpu.sparse_ffn_decode
    got, _ = jax.jit(lambda x: call(x, *(w.get_value() for w in (ffn.c1, ffn.c2, ffn.cb, ffn.w1, ffn.w2, ffn.b2)),
                                    n_elements=8))(x)
    errors[f"sparse_ffn {weights}"] = float(np.abs(np.asarray(got) - np.asarray(want)).max())
tokens = {}
for name in ("sparse_all", "terraformer_one_chunk"):
    for weights in ("float", "int8"):
        model = make_model(**VARIANTS[name])
        model = quantize_model(model) if weights == "int8" else model
        graphdef, params = nnx.split(model, nnx.Param)
        params = params.to_pure_dict()
        prompt = random_tokens(3, (2, 5))
        with_kernels = Decoder(graphdef, params, max_len=model.max_len)
        without = Decoder(graphdef, params, max_len=model.max_len, cpu_kernels=False)
        tokens[f"{name} {weights}"] = {"kernels": with_kernels.generate(prompt, 8).tolist(),
                                       "jax": without.generate(prompt, 8).tolist(),
                                       "used_kernels": with_kernels.cpu_kernels}
report.update(errors=errors, tokens=tokens)
print(json.dumps(report))
