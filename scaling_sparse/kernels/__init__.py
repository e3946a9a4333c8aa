"""Optional compiled CPU kernels for decoding (docs/kernels.md).

`sparse_ffn_decode.cc`, `sparse_qkv_decode.cc` and `cached_attention_decode.cc` are the sparse FFN's,
the sparse QKV's and one position's cached attention decode steps, each one XLA FFI call. They are built by
`make install` (`python -m scaling_sparse.kernels.build`, g++ and the XLA FFI headers that ship with
jaxlib); `cpu.status()` says whether the library is loaded and why not. Where it is not built (no compiler, a
GPU image), or `SCALING_SPARSE_CPU_KERNELS=0`, decoding runs the pure-JAX path, which is also the
reference the kernels are tested against (tests/test_cpu_kernels.py).
"""
