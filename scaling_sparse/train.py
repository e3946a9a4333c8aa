"""The training loop: a jitted pure train step, periodic evaluation, metrics, checkpoints, resume.

The NNX model is split once into (graphdef, params); the step is a pure function of
(params, opt_state, batch, step) under jax.jit with the params and optimizer state donated, and
merges the model inside the traced function, so NNX's Python runs only while tracing. The step's
randomness is fold_in(base_key, step): a run resumed from a checkpoint reproduces the losses of
an uninterrupted one exactly.
"""

from __future__ import annotations

import functools
import json
import pathlib
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scaling_sparse.checkpoint import Checkpointer, check_compatible, save_config
from scaling_sparse.config import ConfigError, validate
from scaling_sparse.metrics import MetricsWriter
from scaling_sparse.model import DecoderLM
from scaling_sparse.optim import make_optimizer, make_schedule

SAMPLE_PROMPT_TOKENS = 16
SAMPLE_NEW_TOKENS = 48


# ----------------------------------------------------------------------------- model and state

def build_model(config) -> DecoderLM:
    return DecoderLM(config.model, rngs=nnx.Rngs(config.train.seed))


def split_model(model: nnx.Module):
    """-> (graphdef, params, rest): params and the (usually empty) non-trainable state as pure dicts."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), rest.to_pure_dict()


def init_state(config):
    """-> (graphdef, params, opt_state, rest), initialised by one jitted program (eager init would
    compile every initializer separately, which dominates start-up for small models)."""
    graphdef, _, _ = split_model(nnx.eval_shape(lambda: build_model(config)))
    params, opt_state, rest = _cached_init(config.model.to_json(sort_keys=True), int(config.train.seed),
                                           _optimizer_key(config.train))()
    return graphdef, params, opt_state, rest


@functools.lru_cache(maxsize=8)
def _cached_init(model_json: str, seed: int, optimizer_key: tuple):
    import ml_collections

    model_config = ml_collections.ConfigDict(json.loads(model_json))
    tx = make_optimizer(ml_collections.ConfigDict(dict(optimizer_key)))

    @jax.jit
    def init():
        _, params, rest = split_model(DecoderLM(model_config, rngs=nnx.Rngs(seed)))
        return params, tx.init(params), rest

    return init


def train_key(seed: int) -> jax.Array:
    # Distinct from the init stream (nnx.Rngs(seed)) so dropout/Gumbel noise is not tied to the init.
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


def weighted_cross_entropy(logits, targets, weights):
    """-> (sum of weighted token losses, sum of weights, weighted count of correct argmax)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights), jnp.sum(correct * weights)


def _optimizer_key(t) -> tuple:
    """The train-config fields the optimizer and schedule depend on (hashable, for the jit cache)."""
    fields = ["optimizer", "learning_rate", "schedule", "warmup_steps", "weight_decay", "grad_clip",
              "adam_b1", "adam_b2"] + (["num_steps"] if t.schedule == "cosine" else [])
    return tuple((f, t[f]) for f in fields)


@functools.lru_cache(maxsize=8)
def _cached_train_step(graphdef, optimizer_key: tuple):
    import ml_collections

    t = ml_collections.ConfigDict(dict(optimizer_key))
    tx, schedule = make_optimizer(t), make_schedule(t)

    def train_step(params, opt_state, rest, batch, step, base_key):
        rng = jax.random.fold_in(base_key, step)

        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest)
            logits = model(batch["inputs"], mode="train", rng=rng)
            loss_sum, weight_sum, _ = weighted_cross_entropy(logits, batch["targets"], batch["weights"])
            return loss_sum / jnp.maximum(weight_sum, 1.0), weight_sum

        (loss, weight_sum), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "tokens": weight_sum, "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(step)}
        return params, opt_state, metrics

    return jax.jit(train_step, donate_argnums=(0, 1))


def make_train_step(graphdef, train_config):
    """-> jitted (params, opt_state, rest, batch, step, base_key) -> (params, opt_state, metrics).
    params and opt_state are donated. Cached per (model graph, optimizer settings), so a resumed
    or repeated run in the same process does not trace and compile again."""
    return _cached_train_step(graphdef, _optimizer_key(train_config))


@functools.lru_cache(maxsize=8)
def make_eval_step(graphdef):
    """-> jitted (params, rest, batch) -> (loss_sum, weight_sum, correct_sum), eval mode (argmax masks)."""

    def eval_step(params, rest, batch):
        logits = nnx.merge(graphdef, params, rest)(batch["inputs"], mode="eval")
        return weighted_cross_entropy(logits, batch["targets"], batch["weights"])

    return jax.jit(eval_step)


def evaluate_batches(eval_step, params, rest, batches) -> dict:
    """Token-weighted validation loss (= log-perplexity, nats/token), perplexity and accuracy."""
    if not batches:
        raise ValueError("no evaluation batches: the validation split is empty (raise data.validation_fraction)")
    sums = jax.device_get([eval_step(params, rest, batch) for batch in batches])
    loss_sum, weight_sum, correct = np.asarray(sums, np.float64).sum(axis=0)
    loss = float(loss_sum / max(weight_sum, 1.0))
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))),
            "eval_accuracy": float(correct / max(weight_sum, 1.0)), "eval_tokens": int(weight_sum)}


# ----------------------------------------------------------------------------- data, checks

def load_data(config, workdir, data=None):
    if data is None:
        from scaling_sparse.data.pipeline import build_data  # lazily: only the TFDS path imports TF
        data = build_data(config, workdir)
    vocab = data.tokenizer.vocab_size
    if vocab > config.model.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size: the tokenizer has {vocab} pieces but the model only "
            f"{config.model.vocab_size} embeddings. Fix: set --config.model.vocab_size={vocab} or more.")
    return data


def load_tokenizer(config, workdir):
    """The run's tokenizer (config.data.tokenizer_path or WORKDIR/tokenizer.model), without
    reading the corpus: generation needs nothing else of the data pipeline."""
    from scaling_sparse.data.pipeline import get_tokenizer

    def missing():
        raise FileNotFoundError(f"no tokenizer in {workdir}: train there first, or set "
                                "--config.data.tokenizer_path=MODEL")

    return get_tokenizer(config, workdir, missing)


def _state_template(config):
    """Abstract {"params", "opt_state", "step", "rng"} for restoring without building real arrays."""
    model = nnx.eval_shape(lambda: build_model(config))
    _, params, _ = split_model(model)
    opt_state = jax.eval_shape(make_optimizer(config.train).init, params)
    return {"params": params, "opt_state": opt_state, "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.eval_shape(lambda: train_key(0))}


def load_model(config, workdir, step: int | None = None) -> tuple[DecoderLM, int]:
    """The model of the workdir's latest (or given) checkpoint -> (model, step)."""
    validate(config)
    check_compatible(config, workdir)
    with Checkpointer(workdir, read_only=True) as ckpt:
        state, _ = ckpt.restore(_state_template(config), step)
    graphdef, _, rest = split_model(nnx.eval_shape(lambda: build_model(config)))
    if jax.tree.leaves(rest):  # non-trainable state (none in today's layers): initialise it for real
        rest = jax.jit(lambda: split_model(build_model(config))[2])()
    return nnx.merge(graphdef, state["params"], rest), int(state["step"])


# ----------------------------------------------------------------------------- stop signals

class GracefulStop:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint and returns. A second Ctrl-C aborts."""

    def __init__(self, echo=print):
        self.signal = None
        self._echo = echo
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        self._echo(f"received {signal.Signals(signum).name}: saving a checkpoint after this step "
                   "(Ctrl-C again to abort without saving)")

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal() only works there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the loop

def _progress(config, start: int):
    if not config.train.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=config.train.num_steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)


def train(config, workdir, *, data=None, echo=print) -> dict:
    """Trains (or resumes) in `workdir`. Returns {"step", "train_loss", "eval_loss", ..., "interrupted"}."""
    validate(config)
    t = config.train
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_compatible(config, workdir)
    data = load_data(config, workdir, data)
    save_config(config, workdir)

    graphdef, params, opt_state, rest = init_state(config)
    # Committed to the device like restored arrays are: a fresh and a resumed run then pass
    # identically placed arguments and share one compiled train step.
    state = jax.device_put({"params": params, "opt_state": opt_state, "rng": train_key(t.seed)}, jax.devices()[0])
    state["step"] = np.int32(0)

    bar = _progress(config, 0)
    say = (lambda s: bar.write(s)) if bar is not None else echo
    ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
    with ckpt, MetricsWriter(workdir, echo=say) as writer, GracefulStop(echo=say) as stop:
        if ckpt.latest_step() is not None:
            state, data_state = ckpt.restore(state)
            data.train.set_state(data_state)
            writer.truncate_after(int(state["step"]))
            say(f"resumed from the checkpoint at step {int(state['step'])} in {ckpt.directory}")
        start = int(state["step"])
        if bar is not None:
            bar.n = bar.last_print_n = start
            bar.refresh()
        params, opt_state, base_key = state["params"], state["opt_state"], state["rng"]
        train_step = make_train_step(graphdef, t)
        eval_step = make_eval_step(graphdef)
        tokens_per_step = t.batch_size * t.seq_len

        summary = {"step": start, "interrupted": False}
        if start >= t.num_steps:
            say(f"nothing to train: the checkpoint is at step {start} and train.num_steps is {t.num_steps}")
        window, window_start, window_time = [], start, time.perf_counter()
        step = start
        try:
            while step < t.num_steps and not stop.requested:
                batch = next(data.train)
                params, opt_state, m = train_step(params, opt_state, rest, batch, np.int32(step), base_key)
                step += 1
                window.append(m["loss"])  # stays on device: no host sync per step
                if bar is not None:
                    bar.update(1)
                final, stopping = step == t.num_steps, stop.requested
                # A stop signal skips the evaluation: a preempted job has little time left.
                is_eval = step % t.eval_every == 0 or final
                if step % t.log_every == 0 or is_eval or stopping:
                    train_loss = float(np.mean(jax.device_get(window)))  # waits for the window's steps
                    now = time.perf_counter()  # after the sync: steps are dispatched asynchronously
                    record = {"train_loss": train_loss,
                              "learning_rate": float(m["learning_rate"]),
                              "grad_norm": float(m["grad_norm"]),
                              "tokens_per_s": (step - window_start) * tokens_per_step / max(now - window_time, 1e-9)}
                    if not np.isfinite(record["train_loss"]):
                        raise FloatingPointError(f"the training loss is {record['train_loss']} at step {step}. "
                                                 "Fix: lower config.train.learning_rate")
                    if is_eval:
                        record.update(evaluate_batches(eval_step, params, rest, data.eval_batches))
                    writer.write(step, record)
                    summary.update(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    window, window_start, window_time = [], step, time.perf_counter()
                if step % t.checkpoint_every == 0 or final or stopping:
                    _save(ckpt, step, params, opt_state, base_key, data)
        finally:
            if bar is not None:
                bar.close()
        summary["step"] = step
        summary["interrupted"] = stop.requested and step < t.num_steps
        if stop.requested:
            summary["signal"] = int(stop.signal)

    if t.sample_at_end and step > start and step == t.num_steps and not summary["interrupted"]:
        # A fixed prompt from any corpus: the start of the first validation document, after an eos
        # as in the packed training stream.
        tok = data.tokenizer
        prompt = [tok.eos_id] + np.asarray(data.eval_batches[0]["inputs"][0][:SAMPLE_PROMPT_TOKENS]).tolist()
        new = min(SAMPLE_NEW_TOKENS, config.model.max_len - len(prompt))
        if new > 0:
            out = sample(nnx.merge(graphdef, params, rest), prompt, new, eos_id=tok.eos_id)
            echo(f"sample (greedy) | prompt: {tok.decode(prompt[1:])!r}\n"
                 f"                | continuation: {tok.decode(out)!r}")
    return summary


def _save(ckpt, step, params, opt_state, base_key, data):
    state = {"params": params, "opt_state": opt_state, "step": np.int32(step), "rng": base_key}
    ckpt.save(step, state, data.train.get_state())


def evaluate(config, workdir, *, data=None) -> dict:
    """Validation metrics of the workdir's latest checkpoint."""
    validate(config)
    model, step = load_model(config, workdir)  # first: no data work when there is no checkpoint
    data = load_data(config, workdir, data)
    graphdef, params, rest = split_model(model)
    metrics = evaluate_batches(make_eval_step(graphdef), params, rest, data.eval_batches)
    return {"step": step, **metrics}


def sample(model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
           seed: int = 0, eos_id: int | None = None) -> list[int]:
    """Continues one prompt (a list of ids) -> generated ids, cut after the first EOS if given."""
    from scaling_sparse.decode import generate

    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token of text")
    if len(prompt_ids) + max_new_tokens > model.max_len:
        raise ValueError(
            f"the prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds model.max_len "
            f"{model.max_len}: shorten the prompt or lower max_new_tokens")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    out = np.asarray(generate(model, np.asarray([prompt_ids], np.int32), max_new_tokens,
                              temperature=temperature, top_k=top_k, seed=seed))[0].tolist()
    if eos_id is not None and eos_id in out:
        out = out[:out.index(eos_id)]
    return out
