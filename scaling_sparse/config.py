"""Config schema, defaults and start-up validation.

Every experiment config under experiments/configs/ starts from `base_config()` and overrides
fields; absl's `config_flags` lets the command line override any of them
(`--config.model.ff_sparsity=64`). `validate()` runs before anything is built and raises
`ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections


class ConfigError(ValueError):
    """An invalid config field or combination; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's fields, typed and frozen: built once from the validated `config.model`
    (`ModelConfig.from_config`), hashable (a jit cache key), and the defaults of `base_config()`."""

    # "decoder": a decoder-only LM (models/decoder_lm.py); "encdec": the paper's encoder-decoder (models/encdec.py,
    # docs/semantics.md §5): bidirectional encoder, decoder with causal self- and cross-attention.
    arch: str = "decoder"
    n_encoder_layers: int = 0     # encdec: encoder blocks; 0 = n_layers
    vocab_size: int = 8000
    d_model: int = 256
    d_ff: int = 1024
    n_heads: int = 4
    n_layers: int = 4
    max_len: int = 512            # learned positional embeddings cover this many positions
    dropout: float = 0.0          # residual / FFN dropout
    attn_dropout: float = 0.0     # attention-probability dropout
    dtype: str = "float32"        # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # storage dtype of trainable parameters
    layer_norm_eps: float = 1e-6
    # Token embedding init (docs/semantics.md §5b): "reference" = uniform with std 1/sqrt(d_model), as
    # trax; "normal" = N(0, 1), which trains faster in short runs under Adafactor's parameter scaling
    # (the stdlib demo presets use it).
    embed_init: str = "reference"
    # Dense Q, K, V init (docs/semantics.md §5b): "reference" = Glorot-uniform over each [d, d], as
    # trax's three Dense layers; "fused" = Glorot-uniform limits of one [d, 3d] matrix (sqrt(2)
    # smaller), the project's earlier init, which the stdlib demo presets keep: it trained faster in
    # 300-step runs (demo eval loss 4.59 vs 5.37 at step 200).
    qkv_init: str = "reference"
    # Sparse-QKV convolution kernel init (docs/semantics.md §2): "reference" = normal, std 1/sqrt(M)
    # (trax's fans ignore the receptive field); "receptive_field" = Glorot-uniform with fans kl ks M,
    # the project's earlier init, which the stdlib demo presets keep: with the reference's, a
    # 100-step stdlib_sparse run reached validation loss 6.28 against 4.76.
    conv_init: str = "reference"
    # Sparse FFN (docs/semantics.md §1). 0 = dense FFN.
    ff_sparsity: int = 0          # N: units per block; d_ff / N blocks
    ff_lowrank: int = 0           # controller rank r; 0 = d_ff // N (see `ff_rank`)
    ff_temperature: float = 0.1
    ff_quant_prob: float = 0.3
    # Sparse QKV (docs/semantics.md §2). 0 = dense Q, K, V projections.
    attn_sparsity: int = 0        # S: modules of the multiplicative layer; M = d_model / S
    attn_length_kernel: int = 3
    attn_output: str = "none"     # output projection after sparse QKV: none | dense | mult
    # Output (loss) layer (docs/semantics.md §3). 0 = dense d_model -> vocab.
    loss_sparsity: int = 0
    loss_type: str = "mult"       # mult | lowrank (used when loss_sparsity > 0 or loss_lowrank > 0)
    loss_lowrank: int = 0
    # Terraformer (docs/semantics.md §4).
    reversible: bool = False
    attention: str = "full"       # full | lsh
    lsh_n_hashes: int = 1
    lsh_chunk_len: int = 128
    lsh_n_buckets: int = 0        # 0 = 2 * seq_len / chunk_len
    ff_sru_units: int = 0         # 0 = no SRU recurrence
    # Compressed dense models (`compress`, docs/compression.md); decoder-only, standard stack, dense
    # layers only. 0 / () = the plain dense model.
    factor_rank_attn: int = 0     # SVD / ASVD: Q, K, V and attention output as rank-r factor pairs
    factor_rank_ff: int = 0       # SVD / ASVD: the FFN's two matrices as rank-r factor pairs
    d_head: int = 0               # attention head width; 0 = d_model // n_heads (CoFi prunes d_model, not it)
    layer_heads: tuple = ()       # CoFi: heads per layer, 0 = no attention sub-layer; () = n_heads in all
    layer_d_ff: tuple = ()        # CoFi: FFN width per layer, 0 = no FFN sub-layer; () = d_ff in all
    # Weight storage (docs/quantization.md): "float" = param_dtype; "int8" = symmetric int8 with a float32
    # scale per row (quantize.py), for decoding and evaluation only (`compress --method=int8`).
    weights: str = "float"

    @property
    def head_dim(self) -> int:
        """The attention head width: d_head, or d_model // n_heads when 0."""
        return self.d_head or self.d_model // self.n_heads

    def heads_of(self, layer: int) -> int:
        """Attention heads of decoder layer `layer` (0 = the layer has no attention sub-layer)."""
        return self.layer_heads[layer] if self.layer_heads else self.n_heads

    def d_ff_of(self, layer: int) -> int:
        """FFN width of decoder layer `layer` (0 = the layer has no FFN sub-layer)."""
        return self.layer_d_ff[layer] if self.layer_d_ff else self.d_ff

    @property
    def encoder_layers(self) -> int:
        """The encoder's depth (encdec): n_encoder_layers, or n_layers when 0."""
        return self.n_encoder_layers or self.n_layers

    @property
    def ff_rank(self) -> int:
        """The controller rank actually used: ff_lowrank, or d_ff // ff_sparsity when 0."""
        if not self.ff_sparsity:
            return 0
        return self.ff_lowrank or self.d_ff // self.ff_sparsity

    @classmethod
    def from_config(cls, m) -> "ModelConfig":
        """From `config.model` (a ConfigDict or dict; a ModelConfig is returned as is). Fields an older
        saved config lacks keep today's defaults; unknown fields are an error naming them."""
        if isinstance(m, cls):
            return m
        values = dict(m.to_dict() if hasattr(m, "to_dict") else m)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"config.model has unknown fields {unknown}. Fix: remove them; the model's fields "
                              f"are {sorted(names)}.")
        for name in ("layer_heads", "layer_d_ff"):  # JSON and ConfigDicts give lists; hashable tuples here
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(ModelConfig().to_dict())

    t = c.train = ml_collections.ConfigDict()
    t.num_steps = 1000
    t.batch_size = 8
    t.seq_len = 256            # decoder-only: the packed window; span corruption: the target length
    t.inputs_len = 512         # span corruption: encoder input length (T5's 512)
    t.optimizer = "adafactor"  # adafactor | adamw
    t.learning_rate = 1.0      # peak; the rsqrt schedule multiplies 1/sqrt(max(step, warmup))
    t.schedule = "rsqrt"       # rsqrt | cosine
    t.warmup_steps = 1000
    t.weight_decay = 1e-5      # decoupled
    # Adafactor's weight decay falls linearly to 0 over this many steps, then stays 0 (trax's
    # `weight_decay_n_steps` = 100000 in the reference C4 configs; docs/semantics.md §5c); 0: constant.
    t.weight_decay_steps = 100_000
    t.grad_clip = 1.0
    t.adam_b1 = 0.9
    t.adam_b2 = 0.98
    t.log_every = 10
    t.eval_every = 100
    t.eval_batches = 8
    t.checkpoint_every = 200
    t.keep_checkpoints = 3
    t.take_over_lease = False  # object-store workdirs: take a lease that looks live (its run is known dead)
    t.seed = 0
    t.sample_at_end = True     # print a sample after training (with the generate settings)
    t.progress = True          # tqdm progress bar
    t.objective = "ce"         # ce | trime (in-batch memory, scaling_sparse/trime_loss.py, docs/trime.md)
    tr = t.trime = ml_collections.ConfigDict()
    tr.memory = "local"        # local (same segment, earlier tokens) | long (consecutive segments of a row group) |
                               # ext (also every other row of the batch)
    tr.group_rows = 4          # long: rows per group of consecutive segments (data/consecutive.py)
    tr.ext_batching = "bm25"   # ext: bm25 (similar segments share a batch, data/bm25_batches.py) | random
    tr.ce_warmup_fraction = 0.05  # plain cross-entropy for this share of train.num_steps, then TRIME (the reference's)
    tr.hide_own_probability = 0.9  # ext: per step, the chance the own segment is hidden (--cross-sent-ratio)

    d = c.data = ml_collections.ConfigDict()
    d.source = "stdlib"        # stdlib | files | jsonl | tfds
    d.path = ""                # files: directory or glob; jsonl: file or glob
    d.text_field = "text"      # jsonl field holding the text
    d.input_field = ""         # jsonl field holding a prefix-LM input segment ("" = plain LM)
    d.target_field = ""        # prefix-LM: jsonl field of the target ("" = text_field); loss on it only
    d.tfds_name = "c4/en:3.1.0"
    d.tfds_data_dir = ""
    d.tfds_reader = "tf.data"  # tf.data: the split in stored order, every process reads all of it, resume skips
                               # the records read (O(records)); grain: ArrayRecord by index, a seeded order,
                               # each process reads its rows' records only, resume in O(1) (data/grain_rows.py)
    d.tokenizer_path = ""      # a SentencePiece .model; "" = train one on the training split
    d.tokenizer_train_chars = 20_000_000
    d.validation_fraction = 0.02
    d.shuffle_seed = 0
    d.max_files = 0            # 0 = all files of the corpus
    d.objective = "lm"         # lm | span_corruption (T5's denoising, batches for model.arch="encdec")
    d.noise_density = 0.15     # span corruption: fraction of tokens masked (T5's)
    d.mean_noise_span_length = 3.0  # span corruption: mean tokens per masked span (T5's)

    # Device mesh (scaling_sparse/sharding.py, docs/architecture.md "Sharding"): axis sizes, -1 = all
    # devices left over (at most one axis). Default: every device on `data` (pure data parallelism).
    ms = c.mesh = ml_collections.ConfigDict()
    ms.data = -1
    ms.fsdp = 1
    ms.tensor = 1
    # Logical axis name -> mesh axes (a name, a tuple of names, or None = replicated), as flax lm1b
    # and maxtext map them. A name missing here is replicated.
    ms.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("blocks", "tensor"),
    )

    g = c.generate = ml_collections.ConfigDict()
    g.temperature = 0.0        # 0 = greedy
    g.top_k = 0                # 0 = no top-k filtering
    g.seed = 0
    return c


_DTYPES = ("float32", "bfloat16")


def _require(ok: bool, field: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {problem}. Fix: {fix}.")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field and combination; returns the config or raises ConfigError."""
    m, t, d = config.model, config.train, config.data
    for name in ("vocab_size", "d_model", "d_ff", "n_heads", "n_layers", "max_len"):
        value = m[name]
        _require(isinstance(value, int) and value > 0, f"model.{name}",
                 f"must be a positive integer, got {value!r}", f"set --config.model.{name}=<int > 0>")
    _require(m.get("d_head", 0) or m.d_model % m.n_heads == 0, "model.n_heads",
             f"d_model {m.d_model} is not divisible by n_heads {m.n_heads}",
             "choose n_heads dividing d_model (e.g. d_model / 64), or set model.d_head")
    for name in ("dropout", "attn_dropout"):
        _require(0.0 <= m[name] < 1.0, f"model.{name}", f"must be in [0, 1), got {m[name]}",
                 f"set --config.model.{name}=0.1 or similar")
    for name in ("dtype", "param_dtype"):
        _require(m[name] in _DTYPES, f"model.{name}", f"unknown dtype {m[name]!r}",
                 f"use one of {_DTYPES}")
    _require(m.embed_init in ("reference", "normal"), "model.embed_init", f"unknown value {m.embed_init!r}",
             "use reference (uniform, std 1/sqrt(d_model)) | normal (N(0, 1))")
    _require(m.qkv_init in ("reference", "fused"), "model.qkv_init", f"unknown value {m.qkv_init!r}",
             "use reference (Glorot over each [d, d]) | fused (Glorot limits of one [d, 3d])")
    _require(m.conv_init in ("reference", "receptive_field"), "model.conv_init", f"unknown value {m.conv_init!r}",
             "use reference (normal, std 1/sqrt(M)) | receptive_field (Glorot-uniform over kl ks M)")
    _require(m.arch in ("decoder", "encdec"), "model.arch", f"unknown value {m.arch!r}", "use decoder | encdec")
    _require(isinstance(m.n_encoder_layers, int) and m.n_encoder_layers >= 0, "model.n_encoder_layers",
             f"must be an integer >= 0, got {m.n_encoder_layers!r}", "0 = as many as model.n_layers")
    # Sizes the layers build arrays from (a config file may compute them, e.g. d_ff / 64 is a float).
    for name in ("ff_sparsity", "ff_lowrank", "attn_sparsity", "attn_length_kernel", "loss_sparsity",
                 "loss_lowrank", "lsh_n_hashes", "lsh_chunk_len", "lsh_n_buckets", "ff_sru_units"):
        value = m[name]
        _require(isinstance(value, int) and not isinstance(value, bool), f"model.{name}",
                 f"must be an integer, got {value!r}", f"set --config.model.{name}=<int>")

    # Sparse FFN.
    _require(m.ff_sparsity >= 0, "model.ff_sparsity", "must be >= 0", "0 = dense, N > 0 = sparse")
    if m.ff_sparsity:
        _require(m.d_ff % m.ff_sparsity == 0, "model.ff_sparsity",
                 f"d_ff {m.d_ff} is not divisible by ff_sparsity {m.ff_sparsity}",
                 "choose d_ff as a multiple of ff_sparsity")
        _require(m.ff_sparsity >= 2, "model.ff_sparsity", "a block of one unit selects nothing",
                 "use ff_sparsity >= 2 (the paper uses 64)")
        rank = m.ff_lowrank or m.d_ff // m.ff_sparsity
        _require(0 < rank <= min(m.d_model, m.d_ff), "model.ff_lowrank",
                 f"controller rank {rank} must be in 1..min(d_model, d_ff)={min(m.d_model, m.d_ff)}",
                 "lower --config.model.ff_lowrank")
        _require(m.ff_temperature >= 0, "model.ff_temperature", "must be >= 0", "use 0.1")
        _require(0.0 <= m.ff_quant_prob <= 1.0, "model.ff_quant_prob", "must be in [0, 1]", "use 0.3")
    _require(m.ff_lowrank >= 0, "model.ff_lowrank", "must be >= 0", "0 = d_ff // ff_sparsity")

    # Sparse QKV.
    _require(m.attn_sparsity >= 0, "model.attn_sparsity", "must be >= 0", "0 = dense, S > 0 = sparse")
    if m.attn_sparsity:
        _require(m.d_model % m.attn_sparsity == 0, "model.attn_sparsity",
                 f"d_model {m.d_model} is not divisible by attn_sparsity {m.attn_sparsity}",
                 "choose S dividing d_model (e.g. n_heads)")
        _require(m.attn_length_kernel >= 1, "model.attn_length_kernel", f"must be >= 1, got {m.attn_length_kernel}",
                 "use 3 (the paper's)")
    _require(m.attn_output in ("none", "dense", "mult"), "model.attn_output",
             f"unknown value {m.attn_output!r}", "use none | dense | mult")

    # Output layer.
    _require(m.loss_sparsity >= 0, "model.loss_sparsity", "must be >= 0", "0 = dense output layer")
    _require(m.get("weights", "float") in ("float", "int8"), "model.weights", f"unknown value {m.get('weights')!r}",
             "use float (training, the default) or int8 (weight-only int8 for eval and decoding)")
    _require(m.loss_type in ("mult", "lowrank"), "model.loss_type", f"unknown value {m.loss_type!r}",
             "use mult | lowrank")
    if m.loss_sparsity and m.loss_type == "mult":
        _require(m.vocab_size % m.loss_sparsity == 0, "model.loss_sparsity",
                 f"vocab_size {m.vocab_size} is not divisible by loss_sparsity {m.loss_sparsity}",
                 "choose a vocab size divisible by the loss sparsity (32000 works with 2, 4, 8)")
        _require(m.loss_sparsity <= m.d_model, "model.loss_sparsity",
                 f"{m.loss_sparsity} modules exceed d_model {m.d_model}", "use 2, 4 or 8")
    _require(m.loss_lowrank >= 0, "model.loss_lowrank", "must be >= 0", "0 = off")
    if m.loss_type == "lowrank" and (m.loss_sparsity or m.loss_lowrank):
        _require(0 < m.loss_lowrank <= min(m.d_model, m.vocab_size), "model.loss_lowrank",
                 f"rank {m.loss_lowrank} must be in 1..min(d_model, vocab_size)",
                 "set --config.model.loss_lowrank to e.g. 64")

    # Terraformer.
    _require(m.attention in ("full", "lsh"), "model.attention", f"unknown value {m.attention!r}",
             "use full | lsh")
    if m.attention == "lsh":  # the rules of layers/lsh.py LSHAttention
        _require(m.lsh_chunk_len >= 1, "model.lsh_chunk_len", f"must be >= 1, got {m.lsh_chunk_len}",
                 "set --config.model.lsh_chunk_len=128 (or another positive chunk length)")
        _require(m.lsh_n_hashes >= 1, "model.lsh_n_hashes", f"must be >= 1, got {m.lsh_n_hashes}",
                 "set --config.model.lsh_n_hashes=1 (the Terraformer's) up to 8")
        _require(m.lsh_n_buckets in (0, 1) or (m.lsh_n_buckets > 1 and m.lsh_n_buckets % 2 == 0),
                 "model.lsh_n_buckets",
                 f"must be 0 (= 2 * seq_len / chunk_len), 1 or even, got {m.lsh_n_buckets}: random rotations "
                 "hash into an even number of buckets",
                 "set --config.model.lsh_n_buckets=0 (the default), or an even number such as "
                 f"{m.lsh_n_buckets + 1 if m.lsh_n_buckets > 1 else 2}")
    _require(m.ff_sru_units >= 0, "model.ff_sru_units", f"must be >= 0, got {m.ff_sru_units}",
             "set --config.model.ff_sru_units=0 (no SRU) or 32 (the paper's)")

    _validate_compressed(m)

    # Training.
    for name in ("num_steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints", "eval_batches"):
        _require(isinstance(t[name], int) and t[name] > 0, f"train.{name}",
                 f"must be a positive integer, got {t[name]!r}", f"set --config.train.{name}=<int > 0>")
    _require(t.seq_len <= m.max_len, "train.seq_len",
             f"seq_len {t.seq_len} exceeds model.max_len {m.max_len}",
             "lower train.seq_len or raise model.max_len")
    _require(t.optimizer in ("adafactor", "adamw"), "train.optimizer", f"unknown {t.optimizer!r}",
             "use adafactor | adamw")
    _require(t.schedule in ("rsqrt", "cosine"), "train.schedule", f"unknown {t.schedule!r}",
             "use rsqrt | cosine")
    _require(0 < t.learning_rate < math.inf, "train.learning_rate", f"must be a finite number > 0, got {t.learning_rate}",
             "e.g. 1.0 (rsqrt) or 3e-4")
    for name in ("weight_decay", "grad_clip", "adam_b1", "adam_b2"):  # inf or NaN diverges a few steps later
        _require(math.isfinite(t[name]) and t[name] >= 0, f"train.{name}", f"must be a finite number >= 0, got "
                 f"{t[name]}", f"set --config.train.{name} to the preset's value ({base_config().train[name]})")
    _require(_is_seed(t.seed), "train.seed", f"must be an integer in [0, 2**63), got {t.seed!r}", "e.g. 0")
    _require(t.warmup_steps >= 1, "train.warmup_steps", "must be >= 1", "e.g. 1000")
    _require(isinstance(t.weight_decay_steps, int) and not isinstance(t.weight_decay_steps, bool)
             and t.weight_decay_steps >= 0, "train.weight_decay_steps",
             f"must be an integer >= 0, got {t.weight_decay_steps!r}",
             "set --config.train.weight_decay_steps=100000 (the reference's) or 0 (constant decay)")

    # TRIME (scaling_sparse/trime_loss.py).
    objective = t.get("objective", "ce")
    _require(objective in ("ce", "trime"), "train.objective", f"unknown {objective!r}", "use ce | trime")
    if objective == "trime":
        tr = t.trime
        _require(tr.memory in ("local", "long", "ext"), "train.trime.memory", f"unknown {tr.memory!r}",
                 "use local | long | ext")
        if tr.memory == "ext":
            batching = tr.get("ext_batching", "bm25")
            _require(batching in ("bm25", "random"), "train.trime.ext_batching", f"unknown {batching!r}",
                     "use bm25 | random")
            _require(batching == "random" or d.source in ("stdlib", "files", "jsonl"), "train.trime.ext_batching",
                     f"BM25 batches are built for the local corpora only, not data.source={d.source!r}",
                     "set --config.train.trime.ext_batching=random")
        if tr.memory == "long":
            _require(d.source in ("stdlib", "files", "jsonl") or d.get("tfds_reader", "tf.data") == "grain",
                     "train.trime.memory", "TRIME_long needs batches of consecutive segments of one stream, built "
                     "for the local corpora and for TFDS read through Grain, not data.tfds_reader="
                     f"{d.get('tfds_reader', 'tf.data')!r}", "add --config.data.tfds_reader=grain (ArrayRecord files)")
            _require(isinstance(tr.group_rows, int) and tr.group_rows >= 1 and t.batch_size % tr.group_rows == 0,
                     "train.trime.group_rows", f"{tr.group_rows!r} does not divide train.batch_size {t.batch_size}",
                     "use a divisor of the batch size, e.g. 4")
        _require(0.0 <= tr.ce_warmup_fraction < 1.0, "train.trime.ce_warmup_fraction",
                 f"must be in [0, 1), got {tr.ce_warmup_fraction}", "use 0.05 (the reference's)")
        _require(0.0 <= tr.hide_own_probability <= 1.0, "train.trime.hide_own_probability",
                 f"must be in [0, 1], got {tr.hide_own_probability}", "use 0.9 (the reference's)")
        _require(m.arch == "decoder" and not d.input_field, "train.objective",
                 "TRIME is a decoder-only language-model objective; this config trains "
                 + ("an encoder-decoder" if m.arch != "decoder" else "prefix-LM examples"),
                 "use --config.train.objective=ce, or a decoder-only model on plain text")

    # Data.
    _require(d.source in ("stdlib", "files", "jsonl", "tfds"), "data.source", f"unknown {d.source!r}",
             "use stdlib | files | jsonl | tfds")
    _require(d.get("tfds_reader", "tf.data") in ("tf.data", "grain"), "data.tfds_reader",
             f"unknown {d.get('tfds_reader')!r}", "use tf.data | grain")
    if d.source in ("files", "jsonl"):
        _require(bool(d.path), "data.path", f"source={d.source} needs a path",
                 "set --config.data.path=DIR, a glob, or a .jsonl file")
    if d.input_field:
        _require(d.source == "jsonl", "data.input_field",
                 f"prefix-LM inputs come from JSONL records, but data.source={d.source!r}",
                 "set --config.data.source=jsonl --config.data.path=FILE.jsonl, or leave input_field empty")
    _require(0.0 < d.validation_fraction < 1.0, "data.validation_fraction", "must be in (0, 1)",
             "use 0.02")
    _require(d.objective in ("lm", "span_corruption"), "data.objective", f"unknown {d.objective!r}",
             "use lm | span_corruption")
    _require(0.0 < d.noise_density < 1.0, "data.noise_density", f"must be in (0, 1), got {d.noise_density}",
             "use 0.15 (T5's)")
    _require(d.mean_noise_span_length >= 1.0, "data.mean_noise_span_length",
             f"must be >= 1, got {d.mean_noise_span_length}", "use 3.0 (T5's)")
    _require(isinstance(t.inputs_len, int) and not isinstance(t.inputs_len, bool) and t.inputs_len > 0,
             "train.inputs_len", f"must be a positive integer, got {t.inputs_len!r}",
             "set --config.train.inputs_len=512 (T5's)")

    # Architecture and objective: the encoder-decoder trains on (input, target) pairs.
    objective = d.get("objective", "lm")
    if m.arch == "encdec":
        _require(objective == "span_corruption", "data.objective",
                 f"model.arch=encdec trains on encoder inputs and decoder targets, but data.objective={objective!r}",
                 "set --config.data.objective=span_corruption (T5's denoising), or use model.arch=decoder")
        _require(m.reversible or m.attention == "full", "model.attention",
                 "LSH attention in an encoder-decoder exists only in the Terraformer (model.reversible=True)",
                 "set --config.model.attention=full, or --config.model.reversible=True")
        _require(t.get("inputs_len", 0) <= m.max_len, "train.inputs_len",
                 f"encoder inputs of {t.get('inputs_len')} tokens exceed model.max_len {m.max_len}",
                 "lower train.inputs_len or raise model.max_len")
    elif objective == "span_corruption":
        _require(False, "data.objective", "span corruption makes encoder inputs and decoder targets, but "
                 "model.arch=decoder has no encoder", "set --config.model.arch=encdec, or data.objective=lm")

    # Mesh (its fit to the devices is checked when the mesh is made: sharding.make_mesh).
    if "mesh" in config:
        sizes = {a: config.mesh[a] for a in ("data", "fsdp", "tensor")}
        for axis, size in sizes.items():
            _require(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.{axis}",
                     f"must be a positive integer or -1 (all devices left), got {size!r}",
                     f"e.g. --config.mesh.{axis}=2")
        _require(list(sizes.values()).count(-1) <= 1, "mesh", f"at most one axis may be -1, got {sizes}",
                 "give the other axes explicit sizes")

    # Sampling (generate, and the sample at the end of training): checked here, before any training.
    if "generate" in config:
        g = config.generate
        _require(isinstance(g.temperature, (int, float)) and 0 <= g.temperature < float("inf"),
                 "generate.temperature", f"must be a finite number >= 0 (0 = greedy), got {g.temperature!r}",
                 "e.g. --config.generate.temperature=0.8")
        _require(_is_seed(g.seed), "generate.seed", f"must be an integer in [0, 2**63), got {g.seed!r}",
                 "e.g. --config.generate.seed=0")
        _require(isinstance(g.top_k, int) and 0 <= g.top_k <= m.vocab_size, "generate.top_k",
                 f"must be in 0..model.vocab_size={m.vocab_size} (0 = off), got {g.top_k!r}",
                 "e.g. --config.generate.top_k=40")
    return config


def _is_seed(value) -> bool:
    """A seed JAX takes as an int64 key (a larger one fails deep inside jax.random)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _validate_compressed(m) -> None:
    """The fields of compressed dense models (docs/compression.md): a dense decoder-only model with the
    standard stack, since SVD, ASVD and CoFi start from one (older saved configs lack the fields)."""
    ranks = {name: m.get(name, 0) for name in ("factor_rank_attn", "factor_rank_ff", "d_head")}
    for name, value in ranks.items():
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"model.{name}",
                 f"must be an integer >= 0, got {value!r}", f"set --config.model.{name}=0 (off) or a positive size")
    per_layer = {name: m.get(name, ()) or () for name in ("layer_heads", "layer_d_ff")}
    for name, values in per_layer.items():
        _require(isinstance(values, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                           for v in values),
                 f"model.{name}", f"must be a list of integers >= 0 (one per layer), got {values!r}",
                 "give one non-negative size per layer, or () for the uniform model")
        _require(not values or len(values) == m.n_layers, f"model.{name}",
                 f"has {len(values)} entries for n_layers {m.n_layers}", "give exactly one entry per layer")
    if not (any(ranks.values()) or any(per_layer.values())):
        return
    used = [n for n in ranks if ranks[n]] + [n for n in per_layer if per_layer[n]]
    for field, value, plain in (("arch", m.arch, "decoder"), ("reversible", m.reversible, False),
                                ("attention", m.attention, "full"), ("ff_sparsity", m.ff_sparsity, 0),
                                ("attn_sparsity", m.attn_sparsity, 0), ("ff_sru_units", m.ff_sru_units, 0)):
        _require(value == plain, f"model.{field}",
                 f"{used} describe a compressed dense decoder, but model.{field}={value!r}",
                 f"set --config.model.{field}={plain!r}, or leave {used} at 0 / ()")
    if ranks["factor_rank_attn"]:
        d_inner = max(per_layer["layer_heads"] or [m.n_heads]) * (ranks["d_head"] or m.d_model // m.n_heads)
        _require(ranks["factor_rank_attn"] <= min(m.d_model, d_inner), "model.factor_rank_attn",
                 f"rank {ranks['factor_rank_attn']} exceeds the attention matrices' min(d_in, d_out)",
                 f"use a rank of at most {min(m.d_model, d_inner)}")
    if ranks["factor_rank_ff"]:
        widest = max(per_layer["layer_d_ff"] or [m.d_ff])
        _require(ranks["factor_rank_ff"] <= min(m.d_model, widest), "model.factor_rank_ff",
                 f"rank {ranks['factor_rank_ff']} exceeds the FFN matrices' min(d_in, d_out)",
                 f"use a rank of at most {min(m.d_model, widest)}")


def configs_dir():
    """experiments/configs/ of this checkout (presets are code there, as the project card asks)."""
    import pathlib

    return pathlib.Path(__file__).resolve().parent.parent / "experiments" / "configs"


def load_config(name_or_path: str) -> ml_collections.ConfigDict:
    """Loads a preset by name (`medium_dense`) or a config file path; returns it validated."""
    import importlib.util
    import pathlib

    path = pathlib.Path(name_or_path)
    if path.suffix != ".py":
        path = configs_dir() / f"{name_or_path}.py"
    if not path.is_file():
        known = sorted(p.stem for p in configs_dir().glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"config {name_or_path!r} not found. Fix: use a file path or one of {known}.")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return validate(module.get_config())
