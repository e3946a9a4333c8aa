"""The decode path's op-level choices (docs/benchmarks.md, "Decode at the memory floor"): argmax as two
reductions gives jnp.argmax's answer, and the compiled decode loop updates the KV caches in place
(no whole-cache copy per token), for dense and LSH attention."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import LSH_ONE_CHUNK, SPARSE_ALL, make_model
from scaling_sparse.decode import Decoder
from scaling_sparse.layers.argmax import first_argmax


def test_first_argmax_equals_jnp_argmax_including_ties():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 7, 33))
    top = x.max(-1) + 1.0
    x = x.at[:, :, 20].set(top).at[:, :, 3].set(top)  # two tied maxima per row: the first wins
    for axis in (-1, 0, 1):
        np.testing.assert_array_equal(first_argmax(x, axis=axis), jnp.argmax(x, axis=axis))
    assert first_argmax(x).dtype == jnp.int32
    assert (first_argmax(x) == 3).all()


@pytest.mark.parametrize("fields", [{}, SPARSE_ALL, dict(**LSH_ONE_CHUNK, **SPARSE_ALL)],
                         ids=["dense", "sparse_all", "lsh_sparse_all"])
def test_decode_loop_updates_the_kv_caches_in_place(fields):
    model = make_model(**fields)
    graphdef, params = nnx.split(model, nnx.Param)
    decoder = Decoder(graphdef, params.to_pure_dict(), max_len=model.max_len)
    cache = decoder.init_cache(decoder.params, 1, 24)
    first, cache = decoder.prefill(decoder.params, jnp.ones((1, 4), jnp.int32), cache, jax.random.PRNGKey(0))
    hlo = decoder.loop.lower(decoder.params, cache, first, 4, jax.random.PRNGKey(0), 8).compile().as_text()
    # Any copy of a cache's size, in whatever layout (the token-major caches were copied transposed).
    kv_sizes = {layer["attn"][name].size for layer in cache for name in ("k", "v")}
    copies = []
    for line in hlo.splitlines():  # an instruction "%name = shape{layout} op(...)"
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]", line)
        if m and int(np.prod([int(d) for d in m.group(2).split(",") if d])) in kv_sizes and (m.group(1).startswith("copy") or " copy(" in line):
            copies.append(line[:200])
    assert not copies, "\n".join(copies)
