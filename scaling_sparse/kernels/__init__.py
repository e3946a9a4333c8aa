"""Optional compiled CPU kernels for decoding (docs/kernels.md).

`sparse_ffn_decode.cc` is the sparse FFN's decode step as one XLA FFI call. It is built by
`make install` (`python -m scaling_sparse.kernels.build`, g++ and the XLA FFI headers that ship with
jaxlib); `cpu.status()` says whether it is loaded and why not. Where it is not built (no compiler, a
GPU image), or `SCALING_SPARSE_CPU_KERNELS=0`, decoding runs the pure-JAX path, which is also the
reference the kernel is tested against (tests/test_cpu_kernels.py).
"""
