"""The training loop: a jitted pure train step over a sharded train state, periodic evaluation,
metrics, checkpoints, resume.

The state comes from the one state builder (state.py): created sharded on the mesh of
`config.mesh`, or restored onto it. The step is a pure function of (train state, batch) under
jax.jit with the state donated and its shardings fixed in and out; XLA partitions it over the mesh
(data, fsdp and tensor parallelism are the same code). The model is merged from (graphdef, params)
inside the traced function, so NNX's Python runs only while tracing. The step's randomness is
fold_in(base_key, step): a run resumed from a checkpoint reproduces the losses of an uninterrupted
one exactly, on any number of devices or processes.

Several processes (distributed.py): each feeds its rows of every global batch
(`jax.make_array_from_process_local_data`); only process 0 writes metrics, TensorBoard, the
progress bar and config.json; every process takes part in orbax's saves.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from scaling_sparse import distributed, sharding
from scaling_sparse.checkpoint import CheckpointError, Checkpointer, check_compatible, save_config
from scaling_sparse.config import ConfigError, ModelConfig, validate
from scaling_sparse.metrics import MetricsWriter
from scaling_sparse.optim import make_optimizer, make_schedule, optimizer_settings
from scaling_sparse import storage
from scaling_sparse.workdir_lock import check_writable, workdir_lock
from scaling_sparse.state import (TrainStateLayout, init_train_state, model_spec, restore_params,
                                  restore_train_state)
from scaling_sparse.trime_loss import trime_token_losses, weighted_trime_loss

SAMPLE_PROMPT_TOKENS = 16
SAMPLE_NEW_TOKENS = 48


class NonFiniteError(RuntimeError):
    """Training diverged: a loss or a parameter is not finite. Nothing after the last good
    checkpoint was saved; the message names it and the fix."""

    exit_code = 1


@jax.jit
def all_finite(tree) -> jax.Array:
    """One reduction over every array of a pytree: True when no value is NaN or infinite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _diverged(step: int, what: str, last_good, ckpt_dir, t) -> NonFiniteError:
    kept = (f"The last good checkpoint is step {last_good} in {ckpt_dir}; it and every earlier one are kept and "
            f"nothing after it was saved, so running the command again resumes from step {last_good}"
            if last_good is not None else "No checkpoint was saved in this run")
    return NonFiniteError(
        f"training diverged at step {step}: {what} is not finite. {kept}. Fix: lower "
        f"--config.train.learning_rate (now {t.learning_rate}), raise --config.train.warmup_steps (now "
        f"{t.warmup_steps}) or clip harder (--config.train.grad_clip, now {t.grad_clip}), then run again")


# ----------------------------------------------------------------------------- steps

def weighted_cross_entropy(logits, targets, weights):
    """-> (sum of weighted token losses, sum of weights, weighted count of correct argmax)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights), jnp.sum(correct * weights)


BATCH_KEYS = ("inputs", "targets", "weights")  # + "decoder_inputs" for the encoder-decoder (data/pipeline.py)


def batch_shardings(mesh, rules, keys=BATCH_KEYS) -> dict:
    s = NamedSharding(mesh, sharding.batch_spec(rules))
    return {k: s for k in keys}


def objective_settings(t) -> tuple:
    """config.train's objective as a hashable jit-cache key: ("ce",) or ("trime", memory, CE warm-up
    steps, the ext hide-own probability, long's rows per group) (trime_loss.py)."""
    if t.get("objective", "ce") != "trime":
        return ("ce",)
    tr = t.trime
    return ("trime", tr.memory, int(round(tr.ce_warmup_fraction * t.num_steps)), float(tr.hide_own_probability),
            int(tr.get("group_rows", 1)))


def _loss(model, batch, rng, step, objective):
    """-> (sum of weighted token losses, sum of weights, 1.0 where the step used TRIME's loss)."""
    if objective[0] == "ce":
        logits = model.logits(batch, mode="train", rng=rng)
        return (*weighted_cross_entropy(logits, batch["targets"], batch["weights"])[:2], jnp.float32(0))
    _, memory, ce_steps, hide_probability, group_rows = objective
    logits, features = model.logits(batch, mode="train", rng=rng, features=True)
    targets, weights = batch["targets"], batch["weights"]
    hide_own = jax.random.bernoulli(jax.random.fold_in(rng, 0x7E1), hide_probability)  # one coin a step

    def memory_loss():
        return weighted_trime_loss(logits, features, targets, weights, memory, hide_own=hide_own, group_rows=group_rows)

    def plain_loss():  # the reference's warm-up: pure cross-entropy, then pure TRIME (no mixture)
        return weighted_cross_entropy(logits, targets, weights)[:2]

    use_memory = step >= ce_steps
    return (*jax.lax.cond(use_memory, memory_loss, plain_loss), use_memory.astype(jnp.float32))


@functools.lru_cache(maxsize=8)
def _train_step(layout: TrainStateLayout, settings: tuple, objective: tuple = ("ce",)):
    tx, schedule = make_optimizer(dict(settings), layout.axes), make_schedule(dict(settings))
    graphdef = layout.graphdef

    def train_step(state, batch):
        with sharding.activation_rules(layout.mesh, layout.rules):
            return _step(state, batch)

    def _step(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)

        def loss_fn(params):
            loss_sum, weight_sum, used_memory = _loss(nnx.merge(graphdef, params), batch, rng, step, objective)
            return loss_sum / jnp.maximum(weight_sum, 1.0), (weight_sum, used_memory)

        (loss, (weight_sum, used_memory)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                     "step": step + 1, "rng": state["rng"]}
        metrics = {"loss": loss, "tokens": weight_sum, "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(step), "trime": used_memory}
        return new_state, metrics

    replicated = sharding.replicated(layout.mesh)
    # Inputs arrive sharded (state.py, global_batch); the output state keeps the layout's shardings.
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=(layout.shardings, replicated))


def make_train_step(layout: TrainStateLayout, train_config):
    """-> jitted (train state, batch) -> (train state, metrics); the state is donated. Cached per
    (layout, optimizer settings), so a resumed or repeated run in the same process compiles once."""
    return _train_step(layout, optimizer_settings(train_config), objective_settings(train_config))


@functools.lru_cache(maxsize=8)
def make_eval_step(graphdef, mesh, rules: tuple, memory: tuple = ("none",)):
    """-> jitted (params, batch) -> (loss_sum, weight_sum, correct_sum), eval mode (argmax masks).
    memory=(kind, temperature): the loss of TRIME's joint distribution over the vocabulary and the
    batch's memory (memory_eval_sums). Inputs keep the shardings they arrive with (state.py's,
    global_batch's)."""

    def eval_step(params, batch):
        with sharding.activation_rules(mesh, rules):
            model = nnx.merge(graphdef, params)
            if memory[0] == "none":
                logits = model.logits(batch, mode="eval")
                return weighted_cross_entropy(logits, batch["targets"], batch["weights"])
            logits, features = model.logits(batch, mode="eval", features=True)
        return memory_eval_sums(logits, features, batch, *memory)

    return jax.jit(eval_step, out_shardings=sharding.replicated(mesh))


def memory_eval_sums(logits, features, batch, kind: str, temperature: float):
    """Evaluation with memory (docs/trime.md): -log p_joint(y) with the memory scores divided by the
    temperature. local: the window's earlier tokens; long: every earlier row of the batch too (evaluation
    batches are consecutive windows of the validation stream, so that is every earlier token of the
    batch, and never a later one). Accuracy stays the vocabulary logits' argmax."""
    targets, weights = batch["targets"], batch["weights"]
    losses = trime_token_losses(logits, features, targets, weights, kind, temperature=temperature,
                                group_rows=targets.shape[0])
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights), jnp.sum(correct * weights)


def global_batch(batch: dict, mesh, rules) -> dict:
    """This process's rows of a global batch -> global jax.Arrays sharded over the batch axes."""
    shardings = batch_shardings(mesh, rules, tuple(batch))
    count = jax.process_count()
    return {k: jax.make_array_from_process_local_data(
        shardings[k], np.asarray(v), (v.shape[0] * count,) + tuple(v.shape[1:])) for k, v in batch.items()}


def evaluate_batches(eval_step, params, batches, mesh, rules) -> dict:
    """Token-weighted validation loss (= log-perplexity, nats/token), perplexity and accuracy."""
    if not batches:
        raise ValueError("no evaluation batches: the validation split is empty (raise data.validation_fraction)")
    sums = jax.device_get([eval_step(params, global_batch(batch, mesh, rules)) for batch in batches])
    loss_sum, weight_sum, correct = np.asarray(sums, np.float64).sum(axis=0)
    loss = float(loss_sum / max(weight_sum, 1.0))
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))),
            "eval_accuracy": float(correct / max(weight_sum, 1.0)), "eval_tokens": int(weight_sum)}


# ----------------------------------------------------------------------------- data, loading

def load_data(config, workdir, data=None):
    """The data pipeline for this process (its rows of every global batch), checked against the model."""
    if data is None:
        from scaling_sparse.data.pipeline import build_data  # lazily: only the TFDS path imports TF

        data = build_data(config, workdir, process_index=jax.process_index(), process_count=jax.process_count())
    vocab = data.tokenizer.vocab_size
    if vocab > config.model.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size: the tokenizer has {vocab} pieces but the model only "
            f"{config.model.vocab_size} embeddings. Fix: set --config.model.vocab_size={vocab} or more.")
    return data


def run_mesh(config, mesh=None):
    """The mesh of config.mesh over every device (or `mesh` as given), checked before anything is
    read or written: the batch divides over its axes, every parameter over its mesh axes."""
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    rules = sharding.logical_rules(config.mesh)
    sharding.check_batch(config.train.batch_size, mesh, rules, jax.process_count())
    model_spec(ModelConfig.from_config(config.model)).shardings(mesh, rules)
    return mesh


def load_params(config, workdir, *, step: int | None = None, mesh=None, dtype: str | None = None,
                weights: str | None = None):
    """The weights of the workdir's latest (or given) checkpoint, restored sharded on `mesh`
    (default: config.mesh over every device) -> (graphdef, params, step). weights "int8" | "float":
    converted at load when the checkpoint holds the other (--weights, docs/quantization.md)."""
    validate(config)
    check_compatible(config, workdir)
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    with Checkpointer(workdir, read_only=True) as ckpt:
        return restore_params(config, mesh, ckpt, step, dtype=dtype, weights=weights)


# ----------------------------------------------------------------------------- stop signals

class GracefulStop:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint and returns. A second Ctrl-C aborts."""

    def __init__(self, echo=print):
        self.signal = None
        self.agreed = None  # the signal every process stopped for (agree())
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

    def agree(self) -> bool:
        """-> whether to stop now: the same answer in every process. A signal any process received
        before this call stops all of them here (they save the same checkpoint together); one small
        all-gather. The decision is made from the gathered values only: the handler may run at any
        bytecode, e.g. right after the all-gather returned, and a signal arriving then must wait for the
        next agreement, or this process would save while the others run the next step (a hang)."""
        local = np.int32(self.signal or 0)  # read once: what this process reports is what it acts on
        if jax.process_count() == 1:
            signals = np.asarray([local])
        else:
            from jax.experimental import multihost_utils

            signals = np.asarray(multihost_utils.process_allgather(local))
        if not np.any(signals):
            return False
        self.agreed = int(np.max(signals))
        return True

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
    if not config.train.progress or not distributed.is_primary():
        return None
    from tqdm import tqdm

    return tqdm(total=config.train.num_steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)


def train(config, workdir, *, data=None, echo=print, mesh=None, step: int | None = None) -> dict:
    """Trains (or resumes) in `workdir` on `mesh` (default: config.mesh over every device of every
    process), from the newest readable checkpoint or from checkpoint `step`.
    Returns {"step", "train_loss", "eval_loss", ..., "interrupted"}."""
    validate(config)
    if config.model.get("weights", "float") == "int8":
        raise ConfigError("model.weights=int8: int8 weights are for evaluation and decoding; training updates float "
                          "weights. Fix: train the float model (model.weights=float) and quantise it when you use it "
                          "(eval/generate --weights=int8, or compress --method=int8)")
    mesh = run_mesh(config, mesh)
    workdir = storage.path(workdir)
    check_writable(workdir)
    check_compatible(config, workdir)
    primary = distributed.is_primary()
    # One run per workdir; the run's primary holds the lock (on object storage a lease, docs/storage.md).
    if storage.is_object_store(workdir):
        from scaling_sparse.workdir_lease import workdir_lease

        held = workdir_lease(workdir, enabled=primary, take_over=config.train.get("take_over_lease", False))
    else:
        held = workdir_lock(workdir, enabled=primary)
    with held as lease:
        return _train_locked(config, workdir, data, echo, mesh, step, primary, lease)


def _restore_or_init(config, mesh, ckpt, step, data, writer, say, primary):
    """-> (layout, state, last good step or None). Unreadable newer checkpoints, and with --step
    the newer ones, are moved aside (kept), so the run's new saves cannot collide with them."""
    if not ckpt.all_steps():
        if step is not None:
            raise CheckpointError(f"--step={step}: there are no checkpoints in {ckpt.directory} yet")
        layout, state = init_train_state(config, mesh)
        return layout, state, None
    layout, state, data_state, failures = restore_train_state(config, mesh, ckpt, step, echo=say)
    restored = int(state["step"])
    unreadable = [s for s, _ in failures]
    superseded = [s for s in ckpt.all_steps() if s > restored and s not in unreadable]
    if primary:
        ckpt.set_aside(unreadable, "unreadable", echo=say)
        ckpt.set_aside(superseded, "superseded", echo=say)
    if jax.process_count() > 1 and (unreadable or superseded):
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("checkpoints set aside")
        ckpt.manager.reload()
    ckpt.protected = {restored}  # until this run ends normally (it may diverge)
    data.train.set_state(data_state)
    writer.truncate_after(restored)
    say(f"resumed from the checkpoint at step {restored} in {ckpt.directory}")
    return layout, state, restored


def _train_locked(config, workdir, data, echo, mesh, step, primary, lease=None) -> dict:
    t = config.train
    rules = sharding.logical_rules(config.mesh)
    data = load_data(config, workdir, data)

    bar = _progress(config, 0)
    say = (lambda s: bar.write(s)) if bar is not None else (echo if primary else (lambda s: None))
    ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
    with ckpt, MetricsWriter(workdir, echo=say, enabled=primary) as writer, GracefulStop(echo=say) as stop:
        layout, state, last_good = _restore_or_init(config, mesh, ckpt, step, data, writer, say, primary)
        if primary:  # only once the run has started: a refused or failed start writes nothing
            save_config(config, workdir)
        start = int(state["step"])
        if bar is not None:
            bar.n = bar.last_print_n = start
            bar.refresh()
        train_step = make_train_step(layout, t)
        eval_step = make_eval_step(layout.graphdef, mesh, rules)
        tokens_per_step = t.batch_size * t.seq_len
        trime = t.get("objective", "ce") == "trime"  # the log says which loss each step used

        summary = {"step": start, "interrupted": False}
        if start >= t.num_steps:
            say(f"nothing to train: the checkpoint is at step {start} and train.num_steps is {t.num_steps}")
        window, window_start, window_time = [], start, time.perf_counter()
        since_save = []  # every loss since the last checkpoint (on device): checked before a save
        step, saved = start, None  # saved: the last step this run checkpointed
        try:
            stopping = stop.agree()  # a signal during start-up stops every process before the first step
            while step < t.num_steps and not stopping:
                state, m = train_step(state, global_batch(next(data.train), mesh, rules))
                step += 1
                window.append(m["loss"])  # stays on device: no host sync per step
                since_save.append(m["loss"])
                if bar is not None:
                    bar.update(1)
                stopping = stop.agree()  # every process stops at the same step
                final = step == t.num_steps
                # A stop signal skips the evaluation: a preempted job has little time left.
                is_eval = step % t.eval_every == 0 or final
                if step % t.log_every == 0 or is_eval or stopping:
                    train_loss = float(np.mean(jax.device_get(window)))  # waits for the window's steps
                    now = time.perf_counter()  # after the sync: steps are dispatched asynchronously
                    record = {"train_loss": train_loss,
                              "learning_rate": float(m["learning_rate"]),
                              "grad_norm": float(m["grad_norm"]),
                              **({"trime": float(m["trime"])} if trime else {}),  # 1: TRIME's loss, 0: CE warm-up
                              "tokens_per_s": (step - window_start) * tokens_per_step / max(now - window_time, 1e-9)}
                    if not np.isfinite(train_loss):
                        raise _diverged(step, f"the training loss ({train_loss})", last_good, ckpt.directory, t)
                    if is_eval:
                        record.update(evaluate_batches(eval_step, state["params"], data.eval_batches, mesh, rules))
                    if lease is not None:
                        lease.check()  # another run took the object-store lease over: write nothing more
                    writer.write(step, record)
                    summary.update(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    window, window_start, window_time = [], step, time.perf_counter()
                if step % t.checkpoint_every == 0 or final or stopping:
                    # Nothing non-finite is ever saved: the losses since the last save and every parameter.
                    if not np.all(np.isfinite(jax.device_get(since_save))):
                        raise _diverged(step, "the training loss", last_good, ckpt.directory, t)
                    if not bool(all_finite(state["params"])):
                        raise _diverged(step, "a parameter", last_good, ckpt.directory, t)
                    if lease is not None:
                        lease.check()  # another run took the object-store lease over: write nothing more
                    ckpt.save(step, state, data.train.get_state())
                    last_good, saved, since_save = step, step, []
        finally:
            if bar is not None:
                bar.close()
        ckpt.protected = set()  # ended normally (finished or stopped by a signal after saving)
        if primary:
            ckpt.rotate()
        summary["step"] = step
        summary["interrupted"] = stopping and step < t.num_steps
        summary["saved_step"], summary["last_checkpoint"] = saved, last_good
        if stopping:
            summary["signal"] = stop.agreed

    if t.sample_at_end and step > start and step == t.num_steps and not summary["interrupted"]:
        _print_sample(config, data, layout.graphdef, state["params"], mesh, echo if primary else None)
    return summary


def _print_sample(config, data, graphdef, params, mesh, echo) -> None:
    """A continuation of a fixed prompt from any corpus, with config.generate's settings: the start of
    the first validation document, after an eos as in the packed training stream; for the
    encoder-decoder, the first validation input (its corrupted text with sentinels) and the decoder's
    prediction of its spans."""
    from scaling_sparse.decode import Decoder, describe_sampling

    tok = data.tokenizer
    first = np.asarray(data.eval_batches[0]["inputs"][0])
    if config.model.arch == "encdec":
        prompt = first[first != tok.pad_id].tolist()
        shown, new = prompt, min(SAMPLE_NEW_TOKENS, config.model.max_len)
    else:
        prompt = [tok.eos_id] + first[:SAMPLE_PROMPT_TOKENS].tolist()
        shown, new = prompt[1:], min(SAMPLE_NEW_TOKENS, config.model.max_len - len(prompt))
    if new <= 0:
        return
    g = config.generate
    out = Decoder(graphdef, params, max_len=config.model.max_len, mesh=mesh, temperature=g.temperature,
                  top_k=g.top_k).sample(prompt, new, seed=g.seed, eos_id=tok.eos_id)
    if echo is not None:
        echo(f"sample ({describe_sampling(g.temperature, g.top_k, g.seed)})\n"
             f"  prompt:       {tok.decode(shown)!r}\n"
             f"  continuation: {tok.decode(out)!r}")


def evaluate(config, workdir, *, data=None, step: int | None = None, mesh=None, memory: str = "none",
             temperatures: tuple = (1.0,), fifo: int = 0, weights: str | None = None) -> dict:
    """Validation metrics of the workdir's latest (or given) checkpoint. memory local | long: with
    TRIME's memory (memory_eval_sums) at each of `temperatures` (a sweep); the metrics are the best
    temperature's, and "memory_sweep" lists every one. fifo=N (memory local or long): a FIFO of
    the last N scored tokens' keys carried across the batches (memory_eval.py, TrimeLM_long's evaluation).
    weights: "int8" / "float" converts the checkpoint's weights at load (load_params)."""
    validate(config)
    if memory == "ext":
        raise ConfigError("--memory=ext: at evaluation the batch's other windows are the text after this one "
                          "(evaluation batches are consecutive windows), so seeing them would leak it. Fix: "
                          "TrimeLM_ext is --memory=local --datastore (the training set's keys); --memory=long sees "
                          "every earlier token of the batch")
    if memory not in ("none", "local", "long"):
        raise ConfigError(f"--memory={memory!r}: use none | local | long")
    if memory != "none" and config.model.arch != "decoder":
        raise ConfigError("--memory: evaluation with memory is for decoder-only models. Fix: --memory=none")
    if fifo and memory not in ("local", "long"):
        raise ConfigError(f"--memory_fifo={fifo} carries keys across batches for --memory=local or long, not {memory}")
    if fifo < 0:
        raise ConfigError(f"--memory_fifo must be >= 0 tokens, got {fifo}")
    if not temperatures or not all(np.isfinite(t) and t > 0 for t in temperatures):
        raise ConfigError(f"--memory_temperature must be numbers > 0, got {list(temperatures)}")
    mesh = run_mesh(config, mesh)
    rules = sharding.logical_rules(config.mesh)
    # The weights first: no data work without a checkpoint.
    graphdef, params, step = load_params(config, workdir, step=step, mesh=mesh, weights=weights)
    data = load_data(config, workdir, data)
    if memory == "none":
        metrics = evaluate_batches(make_eval_step(graphdef, mesh, rules), params, data.eval_batches, mesh, rules)
    else:
        if fifo:
            from scaling_sparse import memory_eval

            batches = [global_batch(b, mesh, rules) for b in data.eval_batches]
            sweep = [{"temperature": float(tau), **memory_eval.evaluate_with_fifo(
                graphdef, params, batches, mesh, rules, kind=memory, temperature=float(tau), size=fifo,
                d_model=config.model.d_model)} for tau in temperatures]
        else:
            sweep = [{"temperature": float(tau),
                      **evaluate_batches(make_eval_step(graphdef, mesh, rules, (memory, float(tau))), params,
                                         data.eval_batches, mesh, rules)} for tau in temperatures]
        best = min(sweep, key=lambda r: r["eval_loss"])
        metrics = {**{k: v for k, v in best.items() if k != "temperature"}, "memory": memory,
                   "memory_temperature": best["temperature"], "memory_sweep": sweep, "memory_fifo": fifo}
    if not np.isfinite(metrics["eval_loss"]):
        raise NonFiniteError(f"the validation loss of the checkpoint at step {step} in {workdir} is "
                             f"{metrics['eval_loss']}: its weights are degenerate (a diverged run). Fix: evaluate an "
                             "earlier checkpoint with --step=N (the steps are the directory names under "
                             f"{storage.path(workdir) / 'checkpoints'})")
    return {"step": step, **metrics}
