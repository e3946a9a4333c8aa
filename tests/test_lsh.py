"""LSH attention: equals full shared-QK causal attention when all tokens share a chunk; causal; decode
attention over the cache equals one-chunk LSH; a model trains over several chunks. (The whole model's
decode equals eval when the sequence fits one chunk: test_decode_equals_forward.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_model, random_tokens, tiny_config
from scaling_sparse.config import ConfigError
from scaling_sparse.layers import lsh
from scaling_sparse.layers.attention import merge_heads_into_batch
from scaling_sparse.layers.lsh import LSHAttention, length_normalized

# Jitted once per static setting: eager op-by-op dispatch would dominate these tests' runtime.
lsh_attention = jax.jit(lsh.lsh_attention, static_argnames=("chunk_len", "n_buckets", "n_hashes", "train",
                                                            "dropout_rate"))
attend_cache = jax.jit(lsh.attend_cache)


def _qv(seed, b=2, length=16, h=2, dh=8):
    kq, kv = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kq, (b, length, h, dh)), jax.random.normal(kv, (b, length, h, dh))


def _full_shared_qk(q, v):
    """Reference: plain causal softmax attention with the reference's unit-length keys
    k = q / sqrt(mean(q^2) + 1e-6) / sqrt(dh) and unscaled queries, self logit -1e5."""
    length, dh = q.shape[1], q.shape[-1]
    k = q / jnp.sqrt(jnp.mean(q ** 2, axis=-1, keepdims=True) + 1e-6) / np.sqrt(dh)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    i = jnp.arange(length)
    scores = jnp.where(i[None, :] <= i[:, None], scores, -1e9)
    scores = jnp.where(i[None, :] == i[:, None], -1e5, scores)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)


@pytest.mark.parametrize("n_buckets,n_hashes", [(1, 1), (1, 3), (4, 2)])
def test_one_chunk_equals_full_causal_attention(n_buckets, n_hashes):
    # One bucket, or one chunk holding every token: LSH sees every earlier key.
    q, v = _qv(0)
    out = lsh_attention(q, v, chunk_len=16, n_buckets=n_buckets, n_hashes=n_hashes, key=jax.random.PRNGKey(5))
    np.testing.assert_allclose(out, _full_shared_qk(q, v), atol=1e-5, rtol=1e-5)


def test_one_bucket_many_chunks_sees_two_chunks_only():
    # One bucket, chunk 4: position t sees keys from its own chunk and the previous one only.
    q, v = _qv(1, length=16)
    out = lsh_attention(q, v, chunk_len=4, n_buckets=1)
    full = _full_shared_qk(q, v)
    np.testing.assert_allclose(out[:, :8], full[:, :8], atol=1e-5, rtol=1e-5)  # chunks 0-1: everything
    assert not np.allclose(out[:, 8:], full[:, 8:], atol=1e-3)


def test_no_query_sees_a_later_value():
    # Keys and buckets come from q only, so changing later values must not change earlier outputs.
    q, v = _qv(2, length=32)
    out = lsh_attention(q, v, chunk_len=4, n_buckets=4, n_hashes=2, key=jax.random.PRNGKey(1))
    v2 = v.at[:, 20:].set(1e3)
    out2 = lsh_attention(q, v2, chunk_len=4, n_buckets=4, n_hashes=2, key=jax.random.PRNGKey(1))
    np.testing.assert_allclose(out[:, :20], out2[:, :20], atol=1e-5)
    assert not np.allclose(out[:, 20:], out2[:, 20:])


def test_first_token_attends_to_itself_and_padding_is_hidden():
    q, v = _qv(3, length=10)  # 10 is not a multiple of the chunk: padded to 12 internally
    out = lsh_attention(q, v, chunk_len=4, n_buckets=2, key=jax.random.PRNGKey(0))
    assert out.shape == v.shape and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out[:, 0], v[:, 0], atol=1e-5)


def test_hashing_buckets_similar_vectors_together():
    # Multi-chunk LSH approximates full attention better when the keys cluster (fixed seeds).
    q, v = _qv(4, length=64, h=1, dh=16)
    out = lsh_attention(q, v, chunk_len=8, n_buckets=8, key=jax.random.PRNGKey(0))
    assert out.shape == v.shape and np.isfinite(np.asarray(out)).all()


def test_attend_cache_matches_one_chunk_lsh():
    q, v = _qv(5, length=12)
    k = length_normalized(q)
    full = lsh_attention(q, v, chunk_len=12, n_buckets=2, key=jax.random.PRNGKey(0))
    # The cache in its layouts (attention.py): keys transposed [b*h, dh, S], values [b*h, S, dh].
    k_t, v_c = merge_heads_into_batch(k).transpose(0, 2, 1), merge_heads_into_batch(v)
    steps = [attend_cache(q[:, t:t + 1], k_t, v_c, jnp.array([t])) for t in range(12)]
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="lsh_n_buckets"):
        LSHAttention(chunk_len=4, n_buckets=3)
    with pytest.raises(ValueError, match="lsh_chunk_len"):
        LSHAttention(chunk_len=0)
    # config.validate applies the same rules at start-up, before anything is built or written
    for fields, field in [(dict(lsh_n_buckets=3), "lsh_n_buckets"), (dict(lsh_chunk_len=0), "lsh_chunk_len"),
                          (dict(lsh_n_hashes=0), "lsh_n_hashes")]:
        with pytest.raises(ConfigError, match=rf"^config\.model\.{field}: .*Fix: "):
            tiny_config(attention="lsh", **fields)


def test_model_trains_with_lsh_over_several_chunks():
    model = make_model(attention="lsh", lsh_chunk_len=4, lsh_n_buckets=4, attn_dropout=0.1)
    tokens = random_tokens(2, (2, 32))

    def loss(m):
        logits = m(tokens, mode="train", rng=jax.random.PRNGKey(3))
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    assert np.isfinite(float(value))
    q_grad = grads["stack"]["blocks"][0]["attn"]["qkv"]["q"]["kernel"][...]
    assert float(jnp.abs(q_grad).sum()) > 0
    # Training draws fresh rotations per step: two keys give different outputs.
    forward = nnx.jit(lambda m, key: m(tokens, mode="train", rng=key))
    assert not np.allclose(forward(model, jax.random.PRNGKey(3)), forward(model, jax.random.PRNGKey(4)))
