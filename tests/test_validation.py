"""config.validate rejects, at start-up, every value a layer constructor would reject later."""

import ml_collections
import pytest

from scaling_sparse.config import ConfigError, load_config, validate
from conftest import make_model, tiny_config

# (model-field overrides, the field the error must name): each is refused by a layer's constructor
# (layers/lsh.py, sru.py, sparse_ffn.py, sparse_qkv.py, multiplicative.py, sparse_output.py).
BAD = [
    (dict(attention="lsh", lsh_chunk_len=0), "model.lsh_chunk_len"),
    (dict(attention="lsh", lsh_n_hashes=0), "model.lsh_n_hashes"),
    (dict(attention="lsh", lsh_n_buckets=3), "model.lsh_n_buckets"),
    (dict(attention="lsh", lsh_n_buckets=-2), "model.lsh_n_buckets"),
    (dict(ff_sru_units=-1), "model.ff_sru_units"),
    (dict(ff_sparsity=1, d_ff=64), "model.ff_sparsity"),
    (dict(ff_sparsity=6), "model.ff_sparsity"),                  # d_ff 64 not a multiple
    (dict(ff_sparsity=8, ff_lowrank=64), "model.ff_lowrank"),    # rank > min(d_model, d_ff)
    (dict(attn_sparsity=3), "model.attn_sparsity"),              # d_model 32 not divisible
    (dict(attn_sparsity=4, attn_length_kernel=0), "model.attn_length_kernel"),
    (dict(attn_sparsity=4, attn_output="mult", n_heads=4), None),  # valid: control
    (dict(loss_sparsity=3), "model.loss_sparsity"),              # vocab 64 not divisible
    (dict(loss_type="lowrank", loss_sparsity=4), "model.loss_lowrank"),
    (dict(attention="lsh", lsh_chunk_len=True), "model.lsh_chunk_len"),
]


@pytest.mark.parametrize("fields, named", BAD, ids=[f"{k}={v}" for f, _ in BAD for k, v in list(f.items())[-1:]])
def test_validate_names_the_field_a_layer_would_reject(fields, named):
    if named is None:
        tiny_config(**fields)
        return
    with pytest.raises(ConfigError, match=rf"^config\.{named}: .+\. Fix: .+") as e:
        tiny_config(**fields)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fields", [dict(attention="lsh", lsh_n_buckets=1), dict(attention="lsh", lsh_n_buckets=4),
                                    dict(ff_sru_units=4)])
def test_the_values_validate_allows_build(fields):
    make_model(**fields)


def test_lsh_fields_are_checked_only_with_lsh_attention():
    # Unused by full attention: a preset may leave them at anything (as attn_length_kernel without sparse QKV).
    tiny_config(attention="full", lsh_chunk_len=0)
    with pytest.raises(ConfigError, match="lsh_chunk_len"):
        tiny_config(attention="lsh", lsh_chunk_len=0)
    validate(tiny_config())


def test_sizes_must_be_integers():
    # ml_collections refuses a float for an int field on update; a config file that builds its own
    # model section (or d_ff / 64 computed into a fresh ConfigDict) is caught here.
    c = load_config("tiny")
    c.model = ml_collections.ConfigDict(dict(c.model.to_dict(), ff_sparsity=8.0))
    with pytest.raises(ConfigError, match=r"^config\.model\.ff_sparsity: must be an integer, got 8\.0"):
        validate(c)
