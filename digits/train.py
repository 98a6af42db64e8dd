"""Training: the plan of a run, its state, the compiled multi-step chunk, evaluation, and THE
training loop (`fit`), which the command line, the benchmark and the tests all call.

A run is a sequence of compiled chunks. Each chunk runs many update steps inside one XLA while
loop (`lax.fori_loop` with a traced trip count, so chunks of any length share one compilation),
gathering mini-batches on the device from a per-epoch permutation of uint8 images. Control
returns to Python only between chunks, where `fit` evaluates and calls its hooks (metrics,
checkpoints, the progress bar: whatever the application plugs in).

K models (seeds x learning rates) train in one program, vmapped; when they share their data the
batch is computed once. On several devices (`Plan.layout`, see `digits.parallel`) the chunk runs
under `jax.shard_map`: models spread along the mesh's model axis, each batch along its data axis
with the gradients all-reduced there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from digits import augment, backprop, compiling, data, gradcheck, layers, losses, model, parallel
from digits.config import Config
from digits.layers import normalization

TRAIN_ACCURACY_EXAMPLES = Config.train_accuracy_examples  # the default prefix that measures train accuracy
_STEP_STREAM = 0x7FFFFFFF  # fold_in(data_key, epoch) orders the data; this stream feeds per-step keys


class TrainState(NamedTuple):
    """params: the model pytree; step: int32 (); learning_rate: float (); data_key: uint32 (2,);
    model_state: what the model keeps besides params (batch-norm statistics; [{}, ...] for most
    models, which adds no leaves, so checkpoints of earlier versions restore unchanged);
    ema: with --ema_decay, {"params", "model_state"}: their debiased exponential moving averages,
    the model that is evaluated (`reported_model`); () without, which adds no leaves either."""

    params: list
    opt_state: optax.OptState
    step: jax.Array
    learning_rate: jax.Array
    data_key: jax.Array
    model_state: list
    ema: Any = ()


def reported_model(state: TrainState) -> tuple[list, list]:
    """(params, model state) that evaluation, checkpoints' readers and serving use: the moving
    averages when the run keeps them (--ema_decay), else the trained values."""
    if state.ema:
        return state.ema["params"], state.ema["model_state"]
    return state.params, state.model_state


def ema_update(ema: dict, params, model_state, decay: float, step: jax.Array) -> dict:
    """The moving averages after update `step` (1, 2, ...): ema += w (new - ema) with
    w = (1 - d) / (1 - d^step), so the average weights step i by d^(step - i), normalised: it
    is step 1's values after step 1, and w tends to 1 - d (`optax.incremental_update`). Batch-norm
    statistics are averaged the same way as the params they go with."""
    d = jnp.asarray(decay, jnp.float32)  # both sides in one precision: the weight is exactly 1 at step 1
    weight = (1 - d) / (1 - jnp.power(d, step.astype(jnp.float32)))
    new = {"params": params, "model_state": model_state}
    def average(e, x):  # a user layer's integer state (a counter) is not averaged
        return optax.incremental_update(x, e, weight.astype(x.dtype)) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(average, ema, new)


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
        raise ValueError(f"layers: the last layer {spec.layers[-1].text} must output {num_classes} values, one per "
                         f"class (e.g. dense:{num_classes}), not {spec.num_classes}")
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
    layout: parallel.Layout = parallel.SINGLE
    shared_data: bool = False  # K models see the same batches: the batch is computed once per step

    @classmethod
    def create(cls, config: Config, dataset: data.Dataset, devices=None) -> Plan:
        """Raises a one-line ValueError when the config does not fit the data or the devices
        (default: all of JAX's default platform; `config.num_devices` picks how many)."""
        n = len(dataset.train)
        if config.batch_size > n:
            raise ValueError(f"batch_size={config.batch_size} exceeds the {n} training images")
        spec = model_spec(config, dataset.image_shape, dataset.num_classes, n)
        spe, full = steps_per_epoch(n, config.batch_size), is_full_batch(config.batch_size, n)
        total = total_steps(config, n)
        batch = n if full else config.batch_size
        layout = parallel.choose_layout(config.num_models, batch, config.num_devices, devices)
        vmapped = config.num_models > 1
        return cls(config, spec, jnp.dtype(config.dtype_name), n, batch, spe, full, total,
                   config.eval_every or (50 if full else spe), vmapped, make_optimizer(config, total, spe), layout,
                   vmapped and (config.num_seeds == 1 or config.shared_data_order))

    @property
    def lanes_spec(self) -> P:
        """How per-model arrays (the state, the data orders) lie on the mesh."""
        return P(parallel.MODEL) if self.vmapped else P()

    @property
    def per_model_order(self) -> bool:
        """Each of the K models has its own data order ((K, N) permutations, vmapped batches)."""
        return self.vmapped and not self.shared_data

    @property
    def perm_spec(self) -> P:
        return self.lanes_spec if self.per_model_order else P()

    def init_state(self, placed: bool = True) -> TrainState:
        """The fresh state of every model, on the mesh (or, placed=False, on the default device)."""
        state = init_run_state(self.config, self.spec, self.tx, self.dtype)
        return self.place(state) if placed else state

    def place(self, state: TrainState) -> TrainState:
        """A state with this plan's shapes onto the devices (a restored or a fresh one)."""
        return state if self.layout.mesh is None else parallel.place(state, self.layout, self.lanes_spec)

    def permutation(self, epoch: int) -> jax.Array:
        """The epoch's data order: int32 (N,), (K, N) for K models that do not share their data,
        (0,) / (K, 0) for full batch (every step sees the whole set). It derives from the
        models' data keys (`seed_keys`), which the config fixes: no state needs to be read."""
        per_lane = self.per_model_order
        if self.full_batch:
            order = jnp.zeros((self.config.num_models, 0) if per_lane else (0,), jnp.int32)
        else:
            keys = [seed_keys(lane["seed"])[1] for lane in self.model_lanes()]
            order = permutations(jnp.stack(keys) if per_lane else keys[0], epoch, self.train_size, per_lane)
        if self.layout.mesh is None:
            return order
        return parallel.place(order, self.layout, self.perm_spec)

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

    def learning_rate(self, step: int, lane: int | None = None) -> float:
        """The effective learning rate at `step` of model `lane` (the mean over models if None)."""
        rates = np.array([m["learning_rate"] for m in self.model_lanes()], np.float64)
        base = float(rates.mean() if lane is None else rates[lane])
        return base * float(self._lr_multiplier(step))

    @functools.cached_property
    def _lr_multiplier(self):
        # Compiled once: run eagerly, an optax schedule compiles each of its operations on its
        # first call (1.5 s for one_cycle, more than the speedrun's final evaluation of a split).
        return compiling.jit(lr_multiplier(self.config, self.total_steps, self.steps_per_epoch))

    def make_chunk(self):
        return make_train_chunk(self)

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
    if config.schedule == "one_cycle":
        # optax.cosine_onecycle_schedule, with the peak at an exact step rather than a fraction.
        total, div = max(total_steps, 1), config.one_cycle_div_factor
        peak = one_cycle_peak(config, total)
        return optax.schedules.piecewise_interpolate_schedule(
            "cosine", 1.0 / div, {peak: div, total: 1.0 / (div * config.one_cycle_final_div_factor)})
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, config.warmup_steps, max(total_steps, config.warmup_steps + 1))


def one_cycle_peak(config: Config, total_steps: int) -> int:
    """The step at which one_cycle reaches the full learning rate: --warmup_steps, or 30% of the
    steps (PyTorch's pct_start). ValueError when it is not before the last step."""
    peak = config.warmup_steps or int(0.3 * total_steps)
    if peak >= total_steps:
        raise ValueError(f"warmup_steps={peak} must be below the run's {total_steps} steps for one_cycle")
    return peak


def make_optimizer(config: Config, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
    """An optax transformation whose updates, times -learning_rate, are the optimizer's step.

    Equal to optax.sgd / optax.adam / optax.adamw with the same hyperparameters, with the
    learning rate pulled out so K models with K learning rates can share one vmapped program.
    `gd` and `sgd` are one transformation; they differ only in the batch they are given.
    """
    adam = optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    direction = {
        "gd": optax.identity,
        "sgd": optax.identity,
        "momentum": lambda: optax.trace(decay=config.momentum),
        "nesterov": lambda: optax.trace(decay=config.momentum, nesterov=True),
        "adam": lambda: adam,
        "adamw": lambda: optax.chain(adam, optax.add_decayed_weights(config.weight_decay)),
    }[config.optimizer]()
    return optax.chain(direction, optax.scale_by_schedule(lr_multiplier(config, total_steps, steps_per_epoch)))


@compiling.jit  # one program: run op by op, its three operations compile one by one (0.25 s)
def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, data key) of a seed: the initialisation, and the data order, augmentation and dropout."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, data_key


def init_state(seed: int, learning_rate: float, spec: model.ModelSpec, tx: optax.GradientTransformation, dtype,
               ema: bool = False) -> TrainState:
    """A fresh state; init and data order both derive from `seed`. With `ema`, the moving
    averages start at the initial values (they weigh nothing once a step is done). Compiled as one
    program: run op by op, the initialisers' dozens of small ops cost seconds of dispatch and
    compilation (12 s for a two-conv net on a busy 2-core CPU)."""
    return _compiled_init_state(jnp.int32(seed), learning_rate, spec, tx, dtype, ema)


@compiling.jit(static_argnames=("spec", "tx", "dtype", "ema"))
def _compiled_init_state(seed, learning_rate, spec, tx, dtype, ema) -> TrainState:
    init_key, data_key = seed_keys(seed)
    params = model.init(init_key, spec, dtype)
    model_state = model.init_state(spec, dtype)
    averages = jax.tree.map(jnp.copy, {"params": params, "model_state": model_state}) if ema else ()
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jnp.asarray(learning_rate, dtype), data_key,
                      model_state, averages)


def init_run_state(config: Config, spec: model.ModelSpec, tx, dtype) -> TrainState:
    """One state, or K = num_seeds x len(learning_rates) states stacked on a leading axis
    (lane i = (seed + s, lr), learning rates outermost). With shared_data_order every lane takes
    the data key of `seed`, so only the initialisations differ."""
    ema = config.ema_decay > 0
    if config.num_models == 1:
        return init_state(config.seed, config.learning_rate, spec, tx, dtype, ema)
    lanes = [init_state(config.seed + s, lr, spec, tx, dtype, ema) for lr in config.learning_rates
             for s in range(config.num_seeds)]
    if config.shared_data_order:
        lanes = [lane._replace(data_key=lanes[0].data_key) for lane in lanes]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *lanes)


def permutations(data_keys: jax.Array, epoch: int, num_examples: int, vmapped: bool) -> jax.Array:
    """This epoch's data order: int32 (N,) from one key (2,), or (K, N) from K keys (K, 2)."""
    if vmapped:
        return jax.vmap(epoch_permutation, in_axes=(0, None, None))(data_keys, epoch, num_examples)
    return epoch_permutation(data_keys, epoch, num_examples)


@compiling.jit(static_argnums=(2,))
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


def plan_value_and_grad(plan: Plan):
    """(params, batch, dropout_key) -> (loss, grads) of one model on the plan's devices: the
    gradient function the config names, and on a data axis the sharded one (each device its
    slice of the batch, then the all-reduce). Not jitted."""
    fn = grad_function(plan.config.grad)
    if plan.layout.data_size == 1:
        return lambda params, batch, key=None: fn(params, batch, plan.spec, key)
    sharded = backprop.data_parallel(fn, parallel.DATA, plan.layout.data_size)
    return jax.shard_map(lambda params, batch, key: sharded(params, batch, plan.spec, key), mesh=plan.layout.mesh,
                         in_specs=(P(), P(parallel.DATA), P()), out_specs=P())


# --- the compiled chunk -------------------------------------------------------------------------


def make_train_chunk(plan: Plan):
    """Returns chunk(state, images, labels, perm, num_steps) -> (state, ChunkStats), not yet jitted.

    state: one model's, or K models' stacked (plan.vmapped); images: uint8 (N, H, W) on the
    device; labels: int32 (N,); perm: this epoch's order, int32 (N,) or (K, N) (see
    `Plan.permutation`; ignored for full batch); num_steps: int32 (), may be traced. A chunk must
    not cross an epoch boundary (the caller passes a new perm at each epoch). ChunkStats has one
    value per model when vmapped.

    On a mesh (`compile_chunk` wraps this in `jax.shard_map`) it is what ONE device runs: its K/M
    models, and its 1/D slice of each batch, whose gradient is all-reduced across the data axis
    (`backprop.data_parallel`). Dropout and augmentation then draw per slice (the key folds in
    the slice index): the same distribution as on one device, not the same draws.
    """
    config, spec, dtype, tx = plan.config, plan.spec, plan.dtype, plan.tx
    shards = plan.layout.data_size
    local_batch = plan.batch_size // shards
    value_and_grad, reference = grad_function(config.grad), backprop.autodiff_value_and_grad
    if shards > 1:
        value_and_grad = backprop.data_parallel(value_and_grad, parallel.DATA, shards)
        reference = backprop.data_parallel(reference, parallel.DATA, shards)
    audit_every = config.audit_every if config.grad == "both" else 0
    augmenting = bool(config.augment_shift or config.augment_rotation or config.augment_scale
                      or config.augment_elastic_alpha)
    needs_keys = augmenting or spec.has_dropout
    prescale = plan.full_batch and not augmenting  # then every step reads the same inputs: convert them once

    def shard_index():
        return jax.lax.axis_index(parallel.DATA) if shards > 1 else 0

    def shard_key(key):
        return jax.random.fold_in(key, shard_index()) if shards > 1 and key is not None else key

    def batch_at(step, augment_key, images, labels, perm):
        """This device's part of the step's batch: (x float (B/D, *input_shape) in [0, 1], labels int32 (B/D,))."""
        if prescale:
            return images, labels
        if not plan.full_batch:
            start = (step % plan.steps_per_epoch) * plan.batch_size + shard_index() * local_batch
            idx = jax.lax.dynamic_slice_in_dim(perm, start, local_batch)
            images, labels = images[idx], labels[idx]
        if augmenting:
            images = augment.augment(shard_key(augment_key), images, config.augment_shift, config.augment_rotation,
                                     config.augment_scale, config.augment_elastic_alpha, config.augment_elastic_sigma)
        return model.inputs(images, spec, dtype), labels

    def audit_step(state, batch, grads, dropout_key, stats):
        def compare(_):
            return gradcheck.tree_agreement(grads, reference(state.params, batch, spec, dropout_key)[1])

        due = state.step % audit_every == 0
        zero = jnp.zeros_like(stats.audit_max_violation)  # (on a mesh: varying as the state does)
        violation, rel, max_abs = jax.lax.cond(due, compare, lambda _: (zero, zero, zero), None)
        return stats._replace(
            audit_count=stats.audit_count + due,
            audit_max_violation=jnp.maximum(stats.audit_max_violation, violation),
            audit_max_rel_error=jnp.maximum(stats.audit_max_rel_error, rel),
            audit_max_abs_error=jnp.maximum(stats.audit_max_abs_error, max_abs),
        )

    def model_step(state, stats, images, labels, perm, batch):
        """One update of one model; `batch` is None unless the models share it."""
        dropout_key, augment_key = step_keys(state.data_key, state.step) if needs_keys else (None, None)
        if batch is None:
            batch = batch_at(state.step, augment_key, images, labels, perm)
        dropout_key = shard_key(dropout_key) if spec.has_dropout else None
        model_state = state.model_state
        if spec.stateful:  # batch statistics of this batch; the audit compares on the same ones
            (loss, model_state), grads = value_and_grad(state.params, batch, spec, dropout_key, model_state)
        else:
            loss, grads = value_and_grad(state.params, batch, spec, dropout_key)
        if audit_every:
            stats = audit_step(state, batch, grads, dropout_key, stats)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p - state.learning_rate * u, state.params, updates)
        bad = (stats.first_bad_step < 0) & ~jnp.isfinite(loss)
        stats = stats._replace(
            loss_sum=stats.loss_sum + loss, first_bad_step=jnp.where(bad, state.step, stats.first_bad_step)
        )
        ema = ema_update(state.ema, params, model_state, config.ema_decay, state.step + 1) if state.ema else ()
        new = TrainState(params, opt_state, state.step + 1, state.learning_rate, state.data_key, model_state, ema)
        return new, stats

    wide = plan.shared_data and isinstance(spec.layers[0], layers.Dense)

    def model_axes(state):
        """Where each state leaf keeps its model axis inside the chunk. With a shared batch, the
        first dense layer's weights (and the optimizer's copies of them) keep it next to the
        units, (n, K, h): then `x @ W_k` for all k is one (B, n) x (n, K*h) product, and
        `x^T dZ_k` one (n, B) x (B, K*h) product, with no transposes between steps."""
        first_w = state.params[0]["w"].shape if wide else None
        return jax.tree.map(lambda leaf: leaf.ndim - 2 if leaf.shape == first_w else 0, state)

    def step_all(state, stats, images, labels, perm, batch):
        if not plan.vmapped:
            return model_step(state, stats, images, labels, perm, batch)
        axes = model_axes(state)
        # A shared batch is not vmapped: every model multiplies the same x.
        in_axes = (axes, 0, None, None, 0 if plan.per_model_order else None, None)
        return jax.vmap(model_step, in_axes=in_axes, out_axes=(axes, 0))(state, stats, images, labels, perm, batch)

    def shared_batch(state, images, labels, perm):
        """The batch every model trains on (their steps and data keys are equal)."""
        if not plan.shared_data:
            return None
        step, data_key = state.step[0], state.data_key[0]
        augment_key = step_keys(data_key, step)[1] if augmenting else None
        return batch_at(step, augment_key, images, labels, perm)

    def chunk(state, images, labels, perm, num_steps):
        def body(_, carry):
            state, stats = carry
            return step_all(state, stats, images, labels, perm, shared_batch(state, images, labels, perm))

        if plan.full_batch and shards > 1:  # this device's slice of the whole set, every step
            start = shard_index() * local_batch
            images = jax.lax.dynamic_slice_in_dim(images, start, local_batch)
            labels = jax.lax.dynamic_slice_in_dim(labels, start, local_batch)
        if prescale:
            images = model.inputs(images, spec, dtype)
        zero = jnp.zeros((), dtype)
        stats = ChunkStats(zero, jnp.asarray(-1, jnp.int32), jnp.zeros((), jnp.int32), zero, zero, zero)
        if plan.vmapped:  # one per model, varying along the mesh's model axis as the state does
            stats = jax.tree.map(lambda x: x + jnp.zeros_like(state.step, x.dtype), stats)
        if wide:
            moved = model_axes(state)
            state = jax.tree.map(lambda x, axis: jnp.moveaxis(x, 0, axis), state, moved)
        state, stats = jax.lax.fori_loop(0, num_steps, body, (state, stats))
        if wide:
            state = jax.tree.map(lambda x, axis: jnp.moveaxis(x, axis, 0), state, moved)
        if plan.vmapped and plan.layout.mesh is not None:  # every device returns every model's stats
            stats = jax.tree.map(gather_models, stats)
        return state, stats

    def gather_models(x):
        """(K/M,) values of this device's models -> (K,) on every device: each writes its own
        slots and a sum over the model axis fills in the rest."""
        local = x.shape[0]
        slots = jnp.zeros((local * plan.layout.model_size,), x.dtype)
        mine = jax.lax.dynamic_update_slice_in_dim(slots, x, jax.lax.axis_index(parallel.MODEL) * local, 0)
        return jax.lax.psum(mine, parallel.MODEL)

    return chunk


def compile_chunk(plan: Plan, state, images, labels, perm):
    """AOT-compiles the plan's chunk (donating the state) so compile time is measured apart from
    step time. On a mesh the chunk runs under `jax.shard_map`: per-model arrays split along the
    model axis, the dataset replicated, the batch split inside the chunk."""
    fn = plan.make_chunk()
    if plan.layout.mesh is not None:
        lanes = plan.lanes_spec
        fn = jax.shard_map(fn, mesh=plan.layout.mesh, in_specs=(lanes, P(), P(), plan.perm_spec, P()),
                           out_specs=(lanes, P()))
    jitted = compiling.jit(fn, platform=plan.layout.platform, donate_argnums=0)
    return compile_step_program(plan, jitted.lower(state, images, labels, perm, jnp.int32(1)))


def compile_step_program(plan: Plan, lowered):
    """Compiles a lowered program of the plan's training step (the chunk, or the benchmark's
    value_and_grad) with `chunk_compiler_options`, or with XLA's defaults where XLA lacks them."""
    options = chunk_compiler_options(plan)
    if options:
        try:
            return lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as e:  # an XLA without the option: its defaults
            if not any(name in str(e) for name in options):
                raise
            warnings.warn(f"this XLA rejects the compiler options {options} (--cpu_ynn_fusions): compiling the "
                          f"training step with its defaults ({str(e).splitlines()[0]})", stacklevel=2)
    return lowered.compile()


YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def chunk_compiler_options(plan: Plan) -> dict:
    """XLA options for the training chunk (`--cpu_ynn_fusions`). XLA:CPU hands dots and
    reductions to YNNPACK fusions by default. For the public speedrun net's step that ran at 38 ms
    against 32-33 without them; conv_best's 61 against 57 ms, chapter 6's (batch 10) 3.7 against
    3.4 ms; a 784-1024-1024-10 net's 19 against 22 ms (medians of calls interleaved in one
    process, quiet AMD EPYC, JAX 0.10.2; docs/performance.md). A net with batch norm ran no faster
    without them (229 against 224 ms), and its forward pass lost precision (both paths' gradients
    1e-5 from a float64 reference against 1e-7, beyond the audit's error model), so `auto` keeps
    them for such nets. An empty fusion type turns them off."""
    choice = plan.config.cpu_ynn_fusions
    if plan.layout.platform != "cpu" or choice == "on":
        return {}
    if choice == "auto" and (_normalizes(plan.spec.layers) or not any(layer.needs_image for layer in plan.spec.layers)):
        return {}
    return {YNN_FUSION_OPTION: ""}


def _normalizes(stack) -> bool:
    """Whether a layer stack (residual bodies included) has a normalization layer, whose batch or
    feature statistics are reductions."""
    return any(isinstance(layer, (normalization.BatchNorm, normalization.LayerNorm))
               or _normalizes(getattr(layer, "body", ())) for layer in stack)


# --- evaluation ---------------------------------------------------------------------------------


# Bytes of evaluation temporaries per compiled evaluation. On CPU, batches small enough to stay
# in the caches are faster: 10,000 images of the speedrun net took 0.79 s in batches of 49 (16
# MiB) against 1.22 s in batches of 199 (64 MiB); 3 vmapped models of it 2.69 against 3.38 s; a
# dense net's the same (docs/training.md, quiet AMD EPYC). 4 or 8 MiB were up to 10% faster for
# one model but up to 40% slower for three. Elsewhere (GPU, TPU; not measured) 64 MiB.
EVAL_MEMORY_BUDGET = 64 * 2**20
CPU_EVAL_MEMORY_BUDGET = 16 * 2**20
MAX_EVAL_BATCH = 10000  # more per batch gains nothing measurable, even for small dense nets


def eval_bytes_per_example(spec: model.ModelSpec, dtype) -> int:
    """An estimate of the temporaries evaluation holds per example: twice the largest of any top-
    level layer's output plus its evaluation-mode cache (for a conv, its im2col patches), read
    from `jax.eval_shape` of the forward pass (no compilation), so user layer kinds count too.

    Twice: XLA keeps a layer's operand and result, and the patches with their source. Measured
    with `compiled.memory_analysis()` (docs/training.md): the conv_15min net's temporaries are
    256 KB per example against an estimate of 293 KB; 784-800-800-10's 6.4 KB against 19 KB (an
    overestimate for residual blocks, whose caches hold their whole body).
    """
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), spec, dtype))
    state = jax.eval_shape(lambda: model.init_state(spec, dtype))
    x = jax.ShapeDtypeStruct((1,) + spec.input_shape, dtype)
    caches = jax.eval_shape(lambda p, s, x: model.forward(p, x, spec, state=s).caches, params, state, x)
    itemsize = jnp.dtype(dtype).itemsize

    def nbytes(tree) -> int:
        return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))

    per_layer = [nbytes(cache) + math.prod(shape) * itemsize for cache, shape in zip(caches, spec.shapes, strict=True)]
    return 2 * max(per_layer + [nbytes(x)])


def eval_memory_budget(platform: str | None = None) -> int:
    """The evaluation temporaries' budget in bytes on `platform` (default: JAX's default backend)."""
    return CPU_EVAL_MEMORY_BUDGET if (platform or jax.default_backend()) == "cpu" else EVAL_MEMORY_BUDGET


def eval_batch_size(spec: model.ModelSpec, dtype, models: int = 1, budget: int | None = None) -> int:
    """Examples per evaluated batch so that K = `models` vmapped models keep their temporaries
    within `budget` bytes (default: `eval_memory_budget()`). With 64 MiB: 224 for the conv_15min
    net (65 MB measured, against 2.56 GB in batches of 10,000), 3495 for 784-800-800-10 (29 MB);
    with the CPU's 16 MiB, 56 and 873. At most MAX_EVAL_BATCH, at least 1."""
    budget = eval_memory_budget() if budget is None else budget
    return int(max(1, min(MAX_EVAL_BATCH, budget // (models * eval_bytes_per_example(spec, dtype)))))


def make_evaluate(spec: model.ModelSpec, dtype, eval_batch: int | None = None):
    """Returns evaluate(params, images, labels, model_state) -> (mean cost, accuracy, predictions
    int32 (N,), probabilities float32 (N, C): the output activations normalised to sum to 1, what
    an ensemble averages), in evaluation mode (no dropout, running statistics). The cost is the plain one,
    against one-hot labels (label smoothing is a training objective, not a metric).

    Runs in padded batches of at most `eval_batch` examples (default: `eval_batch_size`), sized
    evenly (N = 10000 in batches of at most 224 is 45 batches of 223, 35 padding images), one
    compilation per split size. Every example's outputs are computed alone (rows of matmuls), so
    the batch size changes no prediction. Works on one model; `jax.vmap` it over stacked params
    and states for K models (and give `eval_batch` for K: temporaries grow K-fold).
    """
    eval_batch = eval_batch or eval_batch_size(spec, dtype)

    def chunk_outputs(params, model_state, images, labels):
        z = model.predict_logits(params, model.inputs(images, spec, dtype), spec, model_state)
        y = losses.one_hot(labels, spec.num_classes, z.dtype)
        per_example_cost = jax.vmap(lambda zi, yi: losses.cost_from_logits(zi[None], yi[None], spec))(z, y)
        return per_example_cost, jnp.argmax(z, axis=-1).astype(jnp.int32), output_probabilities(z, spec)

    def evaluate(params, images, labels, model_state):
        n = images.shape[0]
        size = -(-n // -(-n // min(eval_batch, n)))  # ceil(n / batches), batches = ceil(n / eval_batch)
        pad = (-n) % size
        images = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
        labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
        shape = (-1, size)
        costs, preds, probs = jax.lax.map(
            lambda c: chunk_outputs(params, model_state, *c),
            (images.reshape(shape + images.shape[1:]), labels.reshape(shape)),
        )
        costs, preds = costs.reshape(-1)[:n], preds.reshape(-1)[:n]
        probs = probs.reshape((-1, probs.shape[-1]))[:n]
        return jnp.mean(costs), jnp.mean(preds == labels[:n]), preds, probs

    return evaluate


def output_probabilities(logits: jax.Array, spec: model.ModelSpec) -> jax.Array:
    """(B, C) logits -> (B, C) float32 class probabilities: the output activations (softmax, or
    sigmoid outputs normalised to sum to 1)."""
    outputs = model.activate(logits, spec.output).astype(jnp.float32)
    return outputs / jnp.sum(outputs, axis=-1, keepdims=True)


def ensemble_predictions(probabilities, keep=None) -> np.ndarray | None:
    """The ensemble of K models' predictions: argmax of the mean of their class probabilities.
    probabilities: (K, N, C); keep: bool (K,), the models to include (default: those whose
    probabilities are all finite, i.e. that did not diverge). (N,) int, or None when none is kept."""
    probabilities = np.asarray(probabilities, np.float64)
    keep = np.isfinite(probabilities).all(axis=(1, 2)) if keep is None else np.asarray(keep, bool)
    return np.argmax(probabilities[keep].mean(axis=0), axis=-1) if keep.any() else None


def ensemble_accuracy(probabilities, labels, keep=None) -> float:
    """The accuracy of `ensemble_predictions` against labels (N,); NaN when no model is kept."""
    predictions = ensemble_predictions(probabilities, keep)
    return math.nan if predictions is None else float(np.mean(predictions == np.asarray(labels)))


class Evaluator:
    """Compiled evaluation of one model or K stacked models, compile time kept apart. Batches are
    sized by memory (`eval_batch_size`, for the K models together)."""

    def __init__(self, spec, dtype, vmapped: bool, layout: parallel.Layout = parallel.SINGLE):
        self.spec, self.dtype, self.vmapped, self.layout = spec, dtype, vmapped, layout
        self.compiled = {}
        self.compile_s = 0.0
        self.eval_s = 0.0

    def _jitted(self, models: int):
        budget = eval_memory_budget(self.layout.platform)
        fn = make_evaluate(self.spec, self.dtype, eval_batch_size(self.spec, self.dtype, models, budget))
        fn = jax.vmap(fn, in_axes=(0, None, None, 0)) if self.vmapped else fn
        # On a mesh the results come back replicated, so every process can read them.
        if self.layout.mesh is None:
            return compiling.jit(fn, platform=self.layout.platform)
        return compiling.jit(fn, platform=self.layout.platform, out_shardings=self.layout.sharding(P()))

    def __call__(self, params, images, labels, model_state=None):
        """model_state: required for models that keep state (batch norm); None otherwise."""
        if model_state is None:
            model_state = model.eval_state(self.spec, None)
        models = jax.tree.leaves(params)[0].shape[0] if self.vmapped else 1
        key = (models, images.shape)
        if key not in self.compiled:
            start = time.perf_counter()
            self.compiled[key] = self._jitted(models).lower(params, images, labels, model_state).compile()
            self.compile_s += time.perf_counter() - start
        start = time.perf_counter()
        outputs = jax.device_get(self.compiled[key](params, images, labels, model_state))
        self.eval_s += time.perf_counter() - start
        return tuple(np.asarray(x) for x in outputs)

    def splits(self, params, device: dict, names, model_state=None) -> dict:
        """{"<split>_loss", "<split>_accuracy", "<split>_predictions", "<split>_probabilities"}
        for each named split (K models: a leading axis of K on each)."""
        results = {}
        for name in names:
            images, labels = device[name]
            if images.shape[0] == 0:
                continue
            for field, value in zip(SPLIT_OUTPUTS, self(params, images, labels, model_state), strict=True):
                results[f"{split_label(name)}_{field}"] = value
        return results


def split_label(name: str) -> str:
    """The key prefix of a split's results: the train-accuracy prefix reports as "train"."""
    return "train" if name == "train_subset" else name


SPLIT_OUTPUTS = ("loss", "accuracy", "predictions", "probabilities")


def split_metrics(found: dict) -> dict:
    """The scalar metrics (per model) of `Evaluator.splits`' results: losses and accuracies."""
    return {k: v for k, v in found.items() if k.endswith(("_loss", "_accuracy"))}


def device_splits(dataset: data.Dataset, layout: parallel.Layout = parallel.SINGLE,
                  train_accuracy_examples: int = TRAIN_ACCURACY_EXAMPLES) -> dict:
    """The splits as (uint8 images, int32 labels) on the device (on every device of a mesh),
    plus "train_subset", the first `train_accuracy_examples` training images (0: none, and no
    train accuracy is evaluated)."""
    n = train_accuracy_examples
    splits = {
        "train": (dataset.train.images, dataset.train.labels),
        "train_subset": (dataset.train.images[:n], dataset.train.labels[:n]),
        "validation": (dataset.validation.images, dataset.validation.labels),
        "test": (dataset.test.images, dataset.test.labels),
    }
    return {name: parallel.replicated(split, layout) for name, split in splits.items()}


def host_step(state: TrainState) -> int:
    """The step counter (every model's is the same), readable in every process."""
    return int(parallel.host_value(state.step).reshape(-1)[0])


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
        """After every compiled chunk, and after its evaluation if it had one (checkpoints, stop requests)."""

    def after_eval(self, step: int, state: TrainState, record: dict) -> None:
        """After every evaluation, with its metrics record (metrics files, progress bar)."""

    def model_diverged(self, lane: int, error: Diverged) -> None:
        """One of K models diverged; the others go on."""


class BestValidation:
    """Per model, the state at the evaluation of its highest validation accuracy so far (the
    earliest one on ties; diverged models never improve): `--select=best_validation`.

    state: a copy of the training state (K models: each lane from its own best evaluation), or
    None before the first; accuracy, step: float64 (K,) and int (K,), -inf and -1 before it.
    `fit` calls `update` at every evaluation; `changed` says whether the last one improved any
    model (then the application saves `state`). Restore one with the saved state and arrays."""

    def __init__(self, num_models: int, state=None, accuracy=None, step=None):
        self.state = state
        self.accuracy = np.full(num_models, -np.inf) if accuracy is None else np.asarray(accuracy, np.float64)
        self.step = np.full(num_models, -1) if step is None else np.asarray(step, np.int64)
        self.changed = False

    def update(self, step: int, state: TrainState, accuracy) -> bool:
        accuracy = np.atleast_1d(np.asarray(accuracy, np.float64))
        improved = np.isfinite(accuracy) & (accuracy > self.accuracy)
        self.changed = bool(improved.any())
        if not self.changed:
            return False
        if self.state is None or improved.all():  # a copy: the next chunk donates `state`
            self.state = jax.tree.map(jnp.copy, state)
        else:
            def pick(best, new):
                return jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, best)

            self.state = jax.tree.map(pick, self.state, state)
        self.accuracy = np.where(improved, accuracy, self.accuracy)
        self.step = np.where(improved, step, self.step)
        return True

    def to_dict(self) -> dict:
        """What restores the tracker with the state (checkpoint metadata)."""
        return {"validation_accuracy": self.accuracy.tolist(), "step": self.step.tolist()}


@dataclasses.dataclass
class FitResult:
    state: TrainState
    diverged: np.ndarray  # bool (K,)
    compile_s: float
    train_s: float
    steps_done: int
    audit: dict
    evaluator: Evaluator
    target: dict | None = None  # {"step", "validation_accuracy"} when --target_accuracy was reached
    best: BestValidation | None = None
    last_eval: tuple[int, dict] | None = None  # (step, Evaluator.splits results) of the last evaluation

    def final_splits(self, device: dict, names) -> dict:
        """`Evaluator.splits` of the final state on `names`, reusing what the evaluation at the
        last step already computed (evaluating a split costs as much as a good part of an epoch)."""
        step = host_step(self.state)
        known = self.last_eval[1] if self.last_eval is not None and self.last_eval[0] == step else {}
        missing = [name for name in names if f"{split_label(name)}_accuracy" not in known]
        params, model_state = reported_model(self.state)
        return {**known, **self.evaluator.splits(params, device, missing, model_state)}

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
        error = Diverged(int(bad_steps[lane]), plan.learning_rate(int(bad_steps[lane]), int(lane)))
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
        "train_accuracy": mean_over_models(results.get("train_accuracy", math.nan)),
        "validation_accuracy": mean_over_models(results.get("validation_accuracy", math.nan)),
        "validation_loss": mean_over_models(results.get("validation_loss", math.nan)),
        "learning_rate": plan.learning_rate(step),
        "examples_per_s": examples_per_s,
    }


def _target_reached(plan: Plan, step: int, validation_accuracy) -> dict | None:
    """The one rule of --target_accuracy: the mean validation accuracy over the models that did
    not diverge (NaN) reaches it."""
    accuracy = mean_over_models(validation_accuracy)
    target = plan.config.target_accuracy
    return {"step": step, "validation_accuracy": accuracy} if target and accuracy >= target else None


def fit(plan: Plan, state: TrainState, device: dict, hooks: Sequence[Hooks] = (),
        best: BestValidation | None = None, clock: dict | None = None) -> FitResult:
    """Trains from `state` (fresh or restored: its step says where) to `plan.total_steps`, or
    with --target_accuracy to the first evaluation that reaches it (`FitResult.target`; a state
    restored at an evaluation step that had reached it trains no further).

    device: `device_splits(dataset)`. Between chunks: divergence checks, the gradient audit,
    `hooks.after_chunk`; at every evaluation, `best.update` (if given) and then a metrics record
    to `hooks.after_eval`. Evaluations use `reported_model(state)`.
    Raises `Diverged` when every model's loss is non-finite (the state before that chunk is gone:
    it was donated; checkpoints are the hooks' business). clock: a dict that fit keeps up to date
    before every hook call with the time so far (compile_s, train_s, steps_timed, eval_s,
    eval_compile_s), for hooks that record the timings of a run that may stop early.
    """
    step = host_step(state)
    evaluator = Evaluator(plan.spec, plan.dtype, plan.vmapped, plan.layout)
    target = None
    if plan.config.target_accuracy and 0 < step < plan.total_steps and step % plan.eval_every == 0:
        params, model_state = reported_model(state)  # a run stopped at its target and resumed
        found = evaluator.splits(params, device, ("validation",), model_state)
        target = _target_reached(plan, step, found["validation_accuracy"])
    epoch = step // plan.steps_per_epoch
    perm = plan.permutation(epoch)
    start = time.perf_counter()
    chunk = compile_chunk(plan, state, *device["train"], perm) if target is None else None
    compile_s = time.perf_counter() - start

    diverged = np.zeros(plan.config.num_models, bool)
    train_s, steps_done, loss_sum, loss_steps, last_eval = 0.0, 0, 0.0, 0, None
    clock = {} if clock is None else clock

    def tick():
        clock.update(compile_s=compile_s, train_s=train_s, steps_timed=steps_done, eval_s=evaluator.eval_s,
                     eval_compile_s=evaluator.compile_s)

    audit = {"count": 0, "max_violation": 0.0, "max_relative_error": 0.0, "max_abs_error": 0.0, "passed": True}
    auditing = plan.config.grad == "both" and plan.config.audit_every > 0
    while step < plan.total_steps and target is None:
        if not plan.full_batch and step // plan.steps_per_epoch != epoch:
            epoch = step // plan.steps_per_epoch
            perm = plan.permutation(epoch)  # a fresh order every epoch
        end = plan.chunk_end(step)
        start = time.perf_counter()
        state, stats = chunk(state, *device["train"], perm, jnp.int32(end - step))
        # Waiting here also keeps XLA:CPU from deadlocking on many queued collectives.
        stats = jax.device_get(stats)
        train_s += time.perf_counter() - start
        steps_done += end - step
        diverged = _check_divergence(plan, state, stats, diverged, hooks)
        loss_sum += np.where(diverged, 0.0, np.atleast_1d(stats.loss_sum)).sum() / max((~diverged).sum(), 1)
        loss_steps += end - step
        if auditing:
            _fold_audit(audit, stats)
        step = end
        # Metrics before checkpoints: a run killed between the two resumes from the previous
        # checkpoint and drops the newer records, rather than missing this step's forever.
        if step % plan.eval_every == 0 or step == plan.total_steps:
            params, model_state = reported_model(state)
            results = evaluator.splits(params, device, ("train_subset", "validation"), model_state)
            last_eval = (step, results)
            record = metrics_record(plan, state, step, loss_sum / max(loss_steps, 1), results,
                                    steps_done * plan.batch_size * plan.config.num_models / max(train_s, 1e-9))
            if auditing:
                record.update({f"grad_audit_{k}": v for k, v in audit.items()})
            if "validation_accuracy" in results:  # diverged models neither improve nor count
                validation = np.where(diverged, np.nan, results["validation_accuracy"])
                target = _target_reached(plan, step, validation)
                if best is not None:
                    best.update(step, state, validation)
            tick()
            for hook in hooks:
                hook.after_eval(step, state, record)
            loss_sum, loss_steps = 0.0, 0
        tick()
        for hook in hooks:
            hook.after_chunk(step, state)
    return FitResult(state, diverged, compile_s, train_s, steps_done, audit, evaluator, target, best, last_eval)
