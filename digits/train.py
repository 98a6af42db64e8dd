"""Training: the plan of a run, its state, the compiled multi-step chunk, evaluation, and THE
training loop (`fit`), which the command line, the benchmark and the tests all call.

A run is a sequence of compiled chunks. Each chunk runs many update steps inside one XLA while
loop (`lax.fori_loop` with a traced trip count, so chunks of any length share one compilation),
gathering mini-batches on the device from a per-epoch permutation of uint8 images. Control
returns to Python only between chunks, where `fit` evaluates and calls its hooks (metrics,
checkpoints, the progress bar: whatever the application plugs in).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from digits import augment, backprop, data, gradcheck, losses, model
from digits.config import Config

TRAIN_ACCURACY_EXAMPLES = 10000  # train accuracy is measured on this fixed prefix, to bound its cost
_STEP_STREAM = 0x7FFFFFFF  # fold_in(data_key, epoch) orders the data; this stream feeds per-step keys


class TrainState(NamedTuple):
    """params: the model pytree; step: int32 (); learning_rate: float (); data_key: uint32 (2,)."""

    params: list
    opt_state: optax.OptState
    step: jax.Array
    learning_rate: jax.Array
    data_key: jax.Array


class ChunkStats(NamedTuple):
    """What a chunk reports back: loss sum, first non-finite step (-1 if none), audit results."""

    loss_sum: jax.Array
    first_bad_step: jax.Array
    audit_count: jax.Array
    audit_max_violation: jax.Array  # worst |manual - auto| / (atol + rtol |auto|); <= 1 agrees
    audit_max_rel_error: jax.Array
    audit_max_abs_error: jax.Array


# --- the shape of a run -------------------------------------------------------------------------


def is_full_batch(batch_size: int, train_size: int) -> bool:
    """The one rule: batch size 0 means the whole training set, and so does a batch of exactly n."""
    return batch_size in (0, train_size)


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Full batch is one step per epoch; otherwise the remainder is dropped."""
    if not 0 <= batch_size <= train_size:
        raise ValueError(f"batch_size={batch_size} must be in [0, {train_size}] (0: full batch)")
    return 1 if is_full_batch(batch_size, train_size) else train_size // batch_size


def total_steps(config: Config, train_size: int) -> int:
    return config.epochs * steps_per_epoch(train_size, config.batch_size) if config.epochs else config.steps


def model_spec(config: Config, image_shape: tuple[int, ...], num_classes: int, train_size: int) -> model.ModelSpec:
    """The model the config describes, checked against the data: the one place for layer-size rules
    that depend on the dataset (the config checks the rest). Raises a one-line ValueError."""
    # Model options reach the spec by name: a new one is a Config field and a ModelSpec field.
    names = {f.name for f in dataclasses.fields(model.ModelSpec)} - {"layers", "input_shape"}
    common = {name: getattr(config, name) for name in names if hasattr(config, name)}
    common["l2"] = config.l2_coefficient(train_size)
    pixels = math.prod(image_shape)
    layers_text = config.layers
    if not layers_text:
        sizes = config.layer_sizes
        if sizes[0] != pixels or sizes[-1] < num_classes:
            raise ValueError(f"layer_sizes must start with {pixels} (pixels) and end with at least {num_classes} "
                             f"(classes) for this dataset, got {','.join(map(str, sizes))}")
        layers_text = ",".join(f"dense:{n}" for n in sizes[1:])
    spec = model.ModelSpec(model.parse_layers(layers_text), tuple(image_shape), **common)
    if not config.layers:
        return spec  # the dense shorthand may have more outputs than classes
    if spec.num_classes != num_classes:
        last = config.layers.split(",")[-1].strip()
        raise ValueError(f"layers: the last layer {last} must be dense:{num_classes} (the class count)")
    return spec


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the training loop needs, derived once from the config and the data."""

    config: Config
    spec: model.ModelSpec
    dtype: object
    train_size: int
    batch_size: int  # the examples per step (n for full batch)
    steps_per_epoch: int
    full_batch: bool
    total_steps: int
    eval_every: int
    vmapped: bool
    tx: optax.GradientTransformation

    @classmethod
    def create(cls, config: Config, dataset: data.Dataset) -> Plan:
        """Raises a one-line ValueError when the config does not fit the data."""
        n = len(dataset.train)
        if config.batch_size > n:
            raise ValueError(f"batch_size={config.batch_size} exceeds the {n} training images")
        spec = model_spec(config, dataset.image_shape, dataset.num_classes, n)
        spe, full, total = steps_per_epoch(n, config.batch_size), is_full_batch(config.batch_size, n), total_steps(config, n)
        return cls(config, spec, jnp.dtype(config.dtype_name), n, n if full else config.batch_size, spe, full, total,
                   config.eval_every or (50 if full else spe), config.num_models > 1, make_optimizer(config, total, spe))

    def init_state(self) -> TrainState:
        return init_run_state(self.config, self.spec, self.tx, self.dtype)

    def permutation(self, state: TrainState, epoch: int) -> jax.Array:
        if self.full_batch:  # every step sees the whole set: no order needed
            return jnp.zeros((self.config.num_models, 0) if self.vmapped else (0,), jnp.int32)
        return permutations(state, epoch, self.train_size, self.vmapped)

    def chunk_end(self, step: int) -> int:
        """Chunks end at evaluations, epochs, checkpoints, `steps_per_call` and the last step,
        all multiples of absolute step numbers, so a resumed run splits its work the same way."""
        ends = [self.total_steps, _next_multiple(step, self.eval_every)]
        if not self.full_batch:
            ends.append(_next_multiple(step, self.steps_per_epoch))
        for every in (self.config.steps_per_call, self.config.checkpoint_every):
            if every:
                ends.append(_next_multiple(step, every))
        return min(ends)

    def learning_rate(self, state: TrainState, step: int, lane: int | None = None) -> float:
        """The effective learning rate at `step` of model `lane` (the mean over models if None)."""
        rates = np.atleast_1d(np.asarray(state.learning_rate, np.float64))
        base = float(rates.mean() if lane is None else rates[lane])
        return base * float(lr_multiplier(self.config, self.total_steps, self.steps_per_epoch)(step))

    def make_chunk(self):
        return make_train_chunk(self.spec, self.tx, self.config, self.batch_size, self.steps_per_epoch,
                                self.full_batch, self.dtype)

    def model_lanes(self) -> list[dict]:
        """Seed and learning rate of each of the K models, in state order."""
        c = self.config
        return [{"seed": c.seed + s, "learning_rate": lr} for lr in c.learning_rates for s in range(c.num_seeds)]


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


# --- optimizer and state ------------------------------------------------------------------------


def lr_multiplier(config: Config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """The schedule's shape in [0, 1]; the base learning rate lives in the state (so it can be vmapped)."""
    if config.schedule == "constant":
        return optax.constant_schedule(1.0)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(1.0, max(total_steps, 1))
    if config.schedule == "exponential":
        return optax.exponential_decay(1.0, config.decay_steps or steps_per_epoch, config.decay_rate)
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, config.warmup_steps, max(total_steps, config.warmup_steps + 1))


def make_optimizer(config: Config, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
    """An optax transformation whose updates, times -learning_rate, are the optimizer's step.

    Equal to optax.sgd / optax.adam / optax.adamw with the same hyperparameters, with the
    learning rate pulled out so K models with K learning rates can share one vmapped program.
    `gd` and `sgd` are one transformation; they differ only in the batch they are given.
    """
    direction = {
        "gd": optax.identity,
        "sgd": optax.identity,
        "momentum": lambda: optax.trace(decay=config.momentum),
        "nesterov": lambda: optax.trace(decay=config.momentum, nesterov=True),
        "adam": optax.scale_by_adam,
        "adamw": lambda: optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(config.weight_decay)),
    }[config.optimizer]()
    return optax.chain(direction, optax.scale_by_schedule(lr_multiplier(config, total_steps, steps_per_epoch)))


def init_state(seed: int, learning_rate: float, spec: model.ModelSpec, tx: optax.GradientTransformation, dtype) -> TrainState:
    """A fresh state; init and data order both derive from `seed`."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(init_key, spec, dtype)
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jnp.asarray(learning_rate, dtype), data_key)


def init_run_state(config: Config, spec: model.ModelSpec, tx, dtype) -> TrainState:
    """One state, or K = num_seeds x len(learning_rates) states stacked on a leading axis
    (lane i = (seed + s, lr), learning rates outermost)."""
    if config.num_models == 1:
        return init_state(config.seed, config.learning_rate, spec, tx, dtype)
    lanes = [init_state(config.seed + s, lr, spec, tx, dtype) for lr in config.learning_rates for s in range(config.num_seeds)]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *lanes)


def permutations(state: TrainState, epoch: int, num_examples: int, vmapped: bool) -> jax.Array:
    """This epoch's data order: int32 (N,), or (K, N) for K stacked models."""
    if vmapped:
        return jax.vmap(epoch_permutation, in_axes=(0, None, None))(state.data_key, epoch, num_examples)
    return epoch_permutation(state.data_key, epoch, num_examples)


@functools.partial(jax.jit, static_argnums=(2,))
def epoch_permutation(data_key: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    """The data order of one epoch: int32 (num_examples,), a pure function of (key, epoch)."""
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples).astype(jnp.int32)


def step_keys(data_key: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(dropout key, augmentation key) of one step: a pure function of (key, step), so a resumed
    run draws the same masks and shifts."""
    dropout_key, augment_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(data_key, _STEP_STREAM), step))
    return dropout_key, augment_key


def grad_function(grad: str):
    """manual (and both, which trains on manual) -> backprop; autodiff -> jax.value_and_grad."""
    return backprop.autodiff_value_and_grad if grad == "autodiff" else backprop.value_and_grad


# --- the compiled chunk -------------------------------------------------------------------------


def make_train_chunk(spec: model.ModelSpec, tx, config: Config, batch_size: int, steps_per_epoch: int,
                     full_batch: bool, dtype):
    """Returns chunk(state, images, labels, perm, num_steps) -> (state, ChunkStats), not yet jitted.

    images: uint8 (N, H, W) on the device; labels: int32 (N,); perm: int32 (N,) this epoch's
    order (ignored for full batch); num_steps: int32 (), may be traced. A chunk must not cross an
    epoch boundary (the caller passes a new perm at each epoch). Uses from the config: grad,
    audit_every and the augmentation settings.
    """
    value_and_grad = grad_function(config.grad)
    audit_every = config.audit_every if config.grad == "both" else 0
    augmenting = bool(config.augment_shift or config.augment_rotation or config.augment_scale)
    needs_keys = augmenting or spec.has_dropout
    prescale = full_batch and not augmenting  # then every step reads the same inputs: convert them once

    def batch_at(state, images, labels, perm, augment_key):
        """The step's batch: (x float (B, *input_shape) in [0, 1], labels int32 (B,))."""
        if prescale:
            return images, labels
        if not full_batch:
            start = (state.step % steps_per_epoch) * batch_size
            idx = jax.lax.dynamic_slice_in_dim(perm, start, batch_size)
            images, labels = images[idx], labels[idx]
        if augmenting:
            images = augment.augment(augment_key, images, config.augment_shift, config.augment_rotation,
                                     config.augment_scale)
        return model.inputs(images, spec, dtype), labels

    def audit_step(state, batch, grads, dropout_key, stats):
        def compare(_):
            reference = backprop.autodiff_value_and_grad(state.params, batch, spec, dropout_key)[1]
            return gradcheck.tree_agreement(grads, reference)

        due = state.step % audit_every == 0
        zero = jnp.zeros((), dtype)
        violation, rel, max_abs = jax.lax.cond(due, compare, lambda _: (zero, zero, zero), None)
        return stats._replace(
            audit_count=stats.audit_count + due,
            audit_max_violation=jnp.maximum(stats.audit_max_violation, violation),
            audit_max_rel_error=jnp.maximum(stats.audit_max_rel_error, rel),
            audit_max_abs_error=jnp.maximum(stats.audit_max_abs_error, max_abs),
        )

    def chunk(state, images, labels, perm, num_steps):
        def body(_, carry):
            state, stats = carry
            dropout_key, augment_key = step_keys(state.data_key, state.step) if needs_keys else (None, None)
            dropout_key = dropout_key if spec.has_dropout else None
            batch = batch_at(state, images, labels, perm, augment_key)
            loss, grads = value_and_grad(state.params, batch, spec, dropout_key)
            if audit_every:
                stats = audit_step(state, batch, grads, dropout_key, stats)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = jax.tree.map(lambda p, u: p - state.learning_rate * u, state.params, updates)
            bad = (stats.first_bad_step < 0) & ~jnp.isfinite(loss)
            stats = stats._replace(
                loss_sum=stats.loss_sum + loss, first_bad_step=jnp.where(bad, state.step, stats.first_bad_step)
            )
            return TrainState(params, opt_state, state.step + 1, state.learning_rate, state.data_key), stats

        if prescale:
            images = model.inputs(images, spec, dtype)
        zero = jnp.zeros((), dtype)
        stats = ChunkStats(zero, jnp.asarray(-1, jnp.int32), jnp.zeros((), jnp.int32), zero, zero, zero)
        return jax.lax.fori_loop(0, num_steps, body, (state, stats))

    return chunk


def compile_chunk(chunk_fn, state, images, labels, perm, vmapped: bool):
    """AOT-compiles a chunk (donating the state) so compile time is measured apart from step time."""
    fn = jax.vmap(chunk_fn, in_axes=(0, None, None, 0, None)) if vmapped else chunk_fn
    jitted = jax.jit(fn, donate_argnums=0)
    return jitted.lower(state, images, labels, perm, jnp.int32(1)).compile()


# --- evaluation ---------------------------------------------------------------------------------


def make_evaluate(spec: model.ModelSpec, dtype, eval_batch: int = 10000):
    """Returns evaluate(params, images, labels) -> (mean cost, accuracy, predictions int32 (N,)).

    Runs in fixed-size padded chunks (one compilation for every split). Works on one model;
    `jax.vmap` it over stacked params for K models.
    """

    def chunk_outputs(params, images, labels):
        z = model.logits(params, model.inputs(images, spec, dtype), spec)
        y = losses.one_hot(labels, spec.num_classes, z.dtype)
        per_example_cost = jax.vmap(lambda zi, yi: losses.cost_from_logits(zi[None], yi[None], spec))(z, y)
        return per_example_cost, jnp.argmax(z, axis=-1).astype(jnp.int32)

    def evaluate(params, images, labels):
        n = images.shape[0]
        size = min(eval_batch, n)
        pad = (-n) % size
        images = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
        labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
        shape = (-1, size)
        costs, preds = jax.lax.map(
            lambda c: chunk_outputs(params, *c),
            (images.reshape(shape + images.shape[1:]), labels.reshape(shape)),
        )
        costs, preds = costs.reshape(-1)[:n], preds.reshape(-1)[:n]
        return jnp.mean(costs), jnp.mean(preds == labels[:n]), preds

    return evaluate


class Evaluator:
    """Compiled evaluation of one model or K stacked models, compile time kept apart."""

    def __init__(self, spec, dtype, vmapped: bool):
        fn = make_evaluate(spec, dtype)
        self.fn = jax.jit(jax.vmap(fn, in_axes=(0, None, None)) if vmapped else fn)
        self.compiled = {}
        self.compile_s = 0.0
        self.eval_s = 0.0

    def __call__(self, params, images, labels):
        key = images.shape
        if key not in self.compiled:
            start = time.perf_counter()
            self.compiled[key] = self.fn.lower(params, images, labels).compile()
            self.compile_s += time.perf_counter() - start
        start = time.perf_counter()
        loss, accuracy, predictions = jax.device_get(self.compiled[key](params, images, labels))
        self.eval_s += time.perf_counter() - start
        return np.asarray(loss), np.asarray(accuracy), np.asarray(predictions)

    def splits(self, params, device: dict, names) -> dict:
        """{"<split>_loss", "<split>_accuracy", "<split>_predictions"} for each named split."""
        results = {}
        for name in names:
            images, labels = device[name]
            if images.shape[0] == 0:
                continue
            loss, accuracy, predictions = self(params, images, labels)
            label = "train" if name == "train_subset" else name
            results[f"{label}_loss"], results[f"{label}_accuracy"], results[f"{label}_predictions"] = loss, accuracy, predictions
        return results


def device_splits(dataset: data.Dataset) -> dict:
    """The splits as (uint8 images, int32 labels) on the device, plus the train-accuracy prefix."""
    n = TRAIN_ACCURACY_EXAMPLES
    return {
        "train": jax.device_put((dataset.train.images, dataset.train.labels)),
        "train_subset": jax.device_put((dataset.train.images[:n], dataset.train.labels[:n])),
        "validation": jax.device_put((dataset.validation.images, dataset.validation.labels)),
        "test": jax.device_put((dataset.test.images, dataset.test.labels)),
    }


def mean_over_models(value) -> float:
    """One model: the value; K models: their mean over models that did not diverge (NaN)."""
    value = np.asarray(value, np.float64)
    finite = value[np.isfinite(value)]
    return float(finite.mean()) if finite.size else math.nan


def summarise(values) -> dict:
    """Mean / std / min / max over models, ignoring diverged (NaN) models."""
    values = np.asarray(values, np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "values": values.tolist()}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "min": float(finite.min()),
            "max": float(finite.max()), "values": values.tolist()}


# --- the training loop --------------------------------------------------------------------------


class Diverged(Exception):
    """Every model's loss went NaN or inf; `step` is the first bad step, `learning_rate` its rate."""

    def __init__(self, step: int, learning_rate: float):
        super().__init__(f"loss diverged (NaN or inf) at step {step} with learning rate {learning_rate:g}")
        self.step, self.learning_rate = step, learning_rate


class Hooks:
    """What `fit` calls between chunks. Subclass and override what you need; each may raise to stop."""

    def after_chunk(self, step: int, state: TrainState) -> None:
        """After every compiled chunk (checkpoints, stop requests)."""

    def after_eval(self, step: int, state: TrainState, record: dict) -> None:
        """After every evaluation, with its metrics record (metrics files, progress bar)."""

    def model_diverged(self, lane: int, error: Diverged) -> None:
        """One of K models diverged; the others go on."""


@dataclasses.dataclass
class FitResult:
    state: TrainState
    diverged: np.ndarray  # bool (K,)
    compile_s: float
    train_s: float
    steps_done: int
    audit: dict
    evaluator: Evaluator

    def timings(self, plan: Plan) -> dict:
        per_step = self.train_s / self.steps_done if self.steps_done else None
        return {
            "compile_s": self.compile_s, "eval_compile_s": self.evaluator.compile_s, "train_s": self.train_s,
            "eval_s": self.evaluator.eval_s, "steps_timed": self.steps_done, "seconds_per_step": per_step,
            "seconds_per_epoch": per_step * plan.steps_per_epoch if per_step else None,
            "examples_per_s": plan.batch_size * plan.config.num_models / per_step if per_step else None,
        }


def _check_divergence(plan: Plan, state, stats, diverged: np.ndarray, hooks: Sequence[Hooks]) -> np.ndarray:
    """Marks models whose loss went NaN/inf; every model diverging stops the run."""
    bad_steps = np.atleast_1d(np.asarray(stats.first_bad_step))
    newly = (bad_steps >= 0) & ~diverged
    for lane in np.flatnonzero(newly):
        error = Diverged(int(bad_steps[lane]), plan.learning_rate(state, int(bad_steps[lane]), int(lane)))
        if (diverged | newly).all():
            raise error
        for hook in hooks:
            hook.model_diverged(int(lane), error)
    return diverged | newly


def _fold_audit(audit: dict, stats: ChunkStats) -> None:
    """Folds one chunk's manual-vs-jax.grad audit (worst over models) into the run's."""
    audit["count"] += int(np.max(stats.audit_count))
    for key, value in (("max_violation", stats.audit_max_violation), ("max_relative_error", stats.audit_max_rel_error),
                       ("max_abs_error", stats.audit_max_abs_error)):
        audit[key] = max(audit[key], float(np.max(value)))
    audit["passed"] = audit["max_violation"] <= 1.0


def metrics_record(plan: Plan, state, step: int, loss: float, results: dict, examples_per_s: float) -> dict:
    """One line of metrics.jsonl (K models: means over the models that did not diverge)."""
    return {
        "step": step, "epoch": step / plan.steps_per_epoch, "loss": loss,
        "train_accuracy": mean_over_models(results["train_accuracy"]),
        "validation_accuracy": mean_over_models(results.get("validation_accuracy", math.nan)),
        "validation_loss": mean_over_models(results.get("validation_loss", math.nan)),
        "learning_rate": plan.learning_rate(state, step),
        "examples_per_s": examples_per_s,
    }


def fit(plan: Plan, state: TrainState, device: dict, hooks: Sequence[Hooks] = ()) -> FitResult:
    """Trains from `state` (fresh or restored: its step says where) to `plan.total_steps`.

    device: `device_splits(dataset)`. Between chunks: divergence checks, the gradient audit,
    `hooks.after_chunk`; at every evaluation, a metrics record to `hooks.after_eval`.
    Raises `Diverged` when every model's loss is non-finite (the state before that chunk is gone:
    it was donated; checkpoints are the hooks' business).
    """
    step = int(np.asarray(state.step).reshape(-1)[0])
    evaluator = Evaluator(plan.spec, plan.dtype, plan.vmapped)
    epoch = step // plan.steps_per_epoch
    perm = plan.permutation(state, epoch)
    start = time.perf_counter()
    chunk = compile_chunk(plan.make_chunk(), state, *device["train"], perm, plan.vmapped)
    compile_s = time.perf_counter() - start

    diverged = np.zeros(plan.config.num_models, bool)
    train_s, steps_done, loss_sum, loss_steps = 0.0, 0, 0.0, 0
    audit = {"count": 0, "max_violation": 0.0, "max_relative_error": 0.0, "max_abs_error": 0.0, "passed": True}
    auditing = plan.config.grad == "both" and plan.config.audit_every > 0
    while step < plan.total_steps:
        if not plan.full_batch and step // plan.steps_per_epoch != epoch:
            epoch = step // plan.steps_per_epoch
            perm = plan.permutation(state, epoch)  # a fresh order every epoch
        end = plan.chunk_end(step)
        start = time.perf_counter()
        state, stats = chunk(state, *device["train"], perm, jnp.int32(end - step))
        stats = jax.device_get(stats)
        train_s += time.perf_counter() - start
        steps_done += end - step
        diverged = _check_divergence(plan, state, stats, diverged, hooks)
        loss_sum += np.where(diverged, 0.0, np.atleast_1d(stats.loss_sum)).sum() / max((~diverged).sum(), 1)
        loss_steps += end - step
        if auditing:
            _fold_audit(audit, stats)
        step = end
        for hook in hooks:
            hook.after_chunk(step, state)
        if step % plan.eval_every == 0 or step == plan.total_steps:
            results = evaluator.splits(state.params, device, ("train_subset", "validation"))
            record = metrics_record(plan, state, step, loss_sum / max(loss_steps, 1), results,
                                    steps_done * plan.batch_size * plan.config.num_models / max(train_s, 1e-9))
            if auditing:
                record.update({f"grad_audit_{k}": v for k, v in audit.items()})
            for hook in hooks:
                hook.after_eval(step, state, record)
            loss_sum, loss_steps = 0.0, 0
    return FitResult(state, diverged, compile_s, train_s, steps_done, audit, evaluator)
