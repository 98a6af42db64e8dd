"""The frozen configuration of a run: the one declaration of every option.

Each field is declared once, with its type, default, help text, bounds or choices, and whether
it belongs to the run's training fingerprint. `run_experiment.py` derives its absl flags from
these declarations; notebooks and tests build a `Config` directly and get the same validation
(a one-line `ValueError`) as the command line. Library code reads only this, never flags.

Adding a hyperparameter is one edit here: a field with `option(...)`; the flag, its help, its
bounds, the JSON in `config.json` and the resume fingerprint follow from it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from typing import Any, Callable

GRADS = ("manual", "autodiff", "both")
OPTIMIZERS = ("gd", "sgd", "momentum", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "exponential", "warmup_cosine", "one_cycle")
SELECTIONS = ("final", "best_validation")
MODES = ("train", "gradcheck", "eval", "predict", "benchmark", "results", "serve")
SOURCES = ("auto", "packaged", "idx", "tfds")
DATASETS = ("mnist", "fashion_mnist", "kmnist")
HIDDEN_ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu", "gelu")
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid")
COSTS = ("cross_entropy", "quadratic")
INITIALIZERS = ("uniform", "normal", "scaled_normal", "glorot", "he")
BENCH_GRADS = ("manual", "autodiff")
BENCH_SWEEPS = ("seeds", "shared_seeds", "learning_rates")
PLATFORMS = ("", "cpu", "gpu", "tpu", "cuda", "rocm")

# Old names still accepted in flagfiles and in the config.json of older workdirs.
RENAMED = {"l2_per_example": "l2_over_train_size"}


def option(default, help: str, *, choices=None, lower=None, upper=None, above=None, below=None,
           fingerprint: bool = True, parse: Callable[[str], Any] | None = None, group: str = "",
           path: bool = False):
    """A Config field: its default and help, bounds (`lower`/`upper` inclusive, `above`/`below`
    exclusive) or `choices`, whether a change of it forbids resuming a run (`fingerprint`), for
    tuples a parser from the flag's text, and whether it is a filesystem path (`path`: the
    command line expands `~` and `$VARS` in it, as a shell user expects)."""
    meta = dict(help=help, choices=choices, lower=lower, upper=upper, above=above, below=below,
                fingerprint=fingerprint, parse=parse, group=group, path=path)
    return dataclasses.field(default=default, metadata=meta)


# --- parsers of list-valued flags (the flag's text -> the field's value) ----------------------------


def _split(text: str, sep: str = ",") -> list[str]:
    return [t.strip() for t in str(text).split(sep) if t.strip()]


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _split(text))
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in _split(text))
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def parse_words(text: str) -> tuple[str, ...]:
    return tuple(_split(text))


def parse_networks(text: str) -> tuple[str, ...]:
    """';'-separated networks, each layer sizes (784,30,10) or a layer stack (conv5x5:20,...)."""
    return tuple("".join(n.split()) for n in _split(text, ";"))


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """Comma-separated batch sizes; 'full' (or 0) is the whole training split."""
    try:
        return tuple(0 if t.lower() == "full" else int(t) for t in _split(text))
    except ValueError:
        raise ValueError(f"expected comma-separated integers or 'full', got {text!r}") from None


def format_value(value) -> str:
    """The flag text of a field's value (the inverse of its parser)."""
    if isinstance(value, tuple):
        sep = ";" if value and isinstance(value[0], str) and any("," in v for v in value) else ","
        return sep.join(str(v) for v in value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on. Defaults are the seed network (784-10-10, 500 GD steps)."""

    # data
    dataset: str = option("mnist", "Dataset name (only mnist is packaged).", choices=DATASETS, group="data")
    data_source: str = option("auto", "auto: TFDS if prepared in --tfds_data_dir, else the packaged MNIST; "
                              "packaged; idx; tfds.", choices=SOURCES)
    cache_dir: str = option("", "Cache for the parsed packaged MNIST (default $XDG_CACHE_HOME/digits or "
                            "~/.cache/digits).", fingerprint=False, path=True)
    idx_dir: str = option("", "Directory with the four IDX files, for --data_source=idx.", fingerprint=False,
                         path=True)
    tfds_data_dir: str = option("", "TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets).",
                                fingerprint=False, path=True)
    tfds_download: bool = option(False, "Allow TFDS to download a missing dataset (needs network).", fingerprint=False)
    validation_size: int = option(10000, "Last N training images held out for validation.", lower=0)
    train_examples: int = option(0, "Use only the first N training images (0: all).", lower=0)
    expand_shifts: bool = option(False, "Train on a fixed 5x expanded set, as Nielsen's expand_mnist.py makes it: "
                                 "each training image and four copies shifted by one pixel (up, down, left, right; "
                                 "the wrapped row or column zeroed), made once and shuffled.")
    # model
    layer_sizes: tuple[int, ...] = option((784, 10, 10), "Dense layer widths, input first: 784,30,10 "
                                          "(ignored when --layers is set).", parse=parse_ints, group="model")
    layers: str = option("", "A layer stack, e.g. conv5x5:20,maxpool2,dense:100,dropout:0.5,dense:10 or "
                         "conv3x3:16:same,batchnorm,relu,res(conv3x3:16:same,batchnorm,relu,conv3x3:16:same),gap,"
                         "dense:10 "
                         "(see the README); empty: the dense net of --layer_sizes.")
    layer_modules: tuple[str, ...] = option((), "Python modules (importable names or .py paths), comma-separated, "
                                            "imported before --layers is parsed: their registered layer kinds are "
                                            "usable in --layers (see docs/layers.md).", parse=parse_words)
    activation: str = option("relu", "Hidden-layer activation after every conv, dense and res layer but the last, "
                             "unless --layers names activation layers itself (leaky_relu: slope 0.01; gelu: exact "
                             "erf form).", choices=HIDDEN_ACTIVATIONS)
    output: str = option("softmax", "Output activation.", choices=OUTPUT_ACTIVATIONS)
    cost: str = option("cross_entropy", "Per-example cost.", choices=COSTS)
    init: str = option("uniform", "uniform: U(-scale, scale); normal: N(0,1); scaled_normal: N(0,1/n_in); "
                       "glorot; he.", choices=INITIALIZERS)
    init_scale: float = option(0.5, "Half-width of the uniform initialiser.", above=0)
    l2: float = option(0.0, "L2 penalty coefficient: loss += 0.5 * l2 * sum(w^2).", lower=0)
    l2_over_train_size: bool = option(False, "Use l2 / n as the coefficient, n the training-set size "
                                      "(Nielsen's lambda / n; formerly --l2_per_example).")
    label_smoothing: float = option(0.0, "Train on targets (1 - s) one_hot + s / C (C classes) instead of one_hot, "
                                    "in the loss and in the hand-derived output delta; evaluation losses stay "
                                    "against one_hot.", lower=0, below=1)
    # optimisation
    grad: str = option("manual", "manual: hand-derived backprop; autodiff: jax.grad; both: train on manual, "
                       "audit against jax.grad.", choices=GRADS, group="optimisation")
    optimizer: str = option("gd", "gd is full-batch gradient descent (the same update as sgd).", choices=OPTIMIZERS)
    learning_rate: float = option(0.1, "Learning rate.", above=0)
    momentum: float = option(0.9, "Momentum for momentum / nesterov.", lower=0, below=1)
    weight_decay: float = option(1e-4, "Decoupled weight decay for adamw.", lower=0)
    adam_b1: float = option(0.9, "Adam's beta1, the decay of its first moment (adam, adamw).", lower=0, below=1)
    adam_b2: float = option(0.999, "Adam's beta2, the decay of its second moment (adam, adamw).", lower=0, below=1)
    adam_eps: float = option(1e-8, "Adam's epsilon, added to the root of the second moment (adam, adamw).", above=0)
    schedule: str = option("constant", "Learning-rate schedule. one_cycle: cosine from lr / one_cycle_div_factor up to "
                           "--learning_rate at step --warmup_steps (0: at 30% of the run), then cosine down to lr / "
                           "(one_cycle_div_factor * one_cycle_final_div_factor) at the last step (Smith's one-cycle, "
                           "optax's cosine_onecycle_schedule, PyTorch's OneCycleLR defaults).", choices=SCHEDULES)
    warmup_steps: int = option(0, "Warm-up steps for warmup_cosine; for one_cycle, the step of the peak (0: 30% of "
                               "the steps).", lower=0)
    one_cycle_div_factor: float = option(25.0, "one_cycle starts at --learning_rate / this.", lower=1)
    one_cycle_final_div_factor: float = option(1e4, "one_cycle ends at its start / this.", lower=1)
    decay_rate: float = option(0.5, "Factor per --decay_steps for the exponential schedule.", above=0)
    decay_steps: int = option(0, "Steps per decay_rate factor (0: one epoch).", lower=0)
    batch_size: int = option(0, "Mini-batch size (0: full batch).", lower=0)
    epochs: int = option(0, "Epochs to train (0: use --steps).", lower=0)
    steps: int = option(500, "Update steps to train when --epochs=0.", lower=1)
    steps_per_call: int = option(0, "Most update steps per compiled call (0: up to the next evaluation).",
                                 lower=0, fingerprint=False)
    cpu_ynn_fusions: str = option("auto", "On CPU, whether XLA hands the training step's dots and reductions to "
                                  "YNNPACK fusions (its default): auto is off for nets with image layers (conv, "
                                  "pool; their step ran 7-17% faster without) unless they normalize, and on "
                                  "for the rest (a dense net's ran 17% slower without).", choices=("auto", "on", "off"),
                                  fingerprint=False)
    eval_every: int = option(0, "Evaluate every N steps (0: every epoch; 50 steps for full batch).",
                             lower=0, fingerprint=False)
    train_accuracy_examples: int = option(10000, "Measure the train accuracy at every evaluation on the first N "
                                          "training images (0: not measured, which saves evaluating them: a third "
                                          "of a one-epoch run's evaluation).", lower=0, fingerprint=False)
    audit_every: int = option(0, "With --grad=both: compare manual with jax.grad every N steps (0: at every "
                             "evaluation).", lower=0)
    ema_decay: float = option(0.0, "Keep an exponential moving average of the parameters and of the model state "
                              "(batch-norm statistics) with this decay per step, e.g. 0.999, and evaluate, checkpoint "
                              "and serve it (0: off). Debiased: at step t it is the average of the steps' values "
                              "weighted d^(t - i), normalised by 1 - d^t.", lower=0, below=1)
    target_accuracy: float = option(0.0, "End training at the first evaluation whose validation accuracy (the mean "
                                    "over the models) reaches this; summary.json records its step and time (0: off; "
                                    "--eval_every sets how often it is looked at).", lower=0, upper=1,
                                    fingerprint=False)
    select: str = option("final", "Which model the run reports as its own and eval, predict and serve use: final, or "
                         "best_validation, each model at the evaluation of its best validation accuracy (kept in "
                         "<workdir>/best; its test accuracy is reported beside the final one's).", choices=SELECTIONS)
    seed: int = option(0, "Seed of the initialisation and the data order.", lower=0)
    x64: bool = option(False, "Train and check gradients in float64.")
    num_seeds: int = option(1, "Train K models (seeds seed..seed+K-1) at once with jax.vmap.", lower=1)
    sweep_learning_rates: tuple[float, ...] = option((), "Also vmap over these learning rates (crossed with "
                                                     "the seeds).", parse=parse_floats, above=0)
    shared_data_order: bool = option(False, "With --num_seeds > 1: every seed sees the same batches (the data order, "
                                     "augmentation and dropout of --seed), so seeds vary only the initialisation and "
                                     "the K models' first-layer products run as one wide matmul. Learning-rate sweeps "
                                     "of one seed always share their data.")
    # devices
    num_devices: int = option(0, "Devices to use (0: all of the platform's devices, as many as the models and the "
                              "batch split evenly). K models spread over a 'model' mesh axis (gcd(K, devices)), each "
                              "batch over a 'data' axis (the rest).", lower=0, fingerprint=False, group="devices")
    # augmentation
    augment_shift: int = option(0, "Random shifts of up to N pixels per training image (Nielsen's expanded "
                                "data: 1).", lower=0, upper=8, group="augmentation")
    augment_rotation: float = option(0.0, "Random rotations of up to this many degrees.", lower=0, upper=180)
    augment_scale: float = option(0.0, "Random scaling by a factor in [1 - s, 1 + s].", lower=0, below=1)
    augment_elastic_alpha: float = option(0.0, "Elastic distortions (Simard et al. 2003): a random displacement field, "
                                          "U(-1, 1) per pixel smoothed by a Gaussian of std --augment_elastic_sigma, "
                                          "times this many pixels (Simard: 34 with sigma 4; 0: off).", lower=0,
                                          upper=100)
    augment_elastic_sigma: float = option(4.0, "Std of the elastic field's Gaussian smoothing, in pixels.", above=0,
                                          upper=28)
    # outputs
    checkpoint_every: int = option(0, "Checkpoint every N steps (0: only at the end).", lower=0,
                                   fingerprint=False, group="outputs")
    keep_checkpoints: int = option(3, "How many recent checkpoints to keep.", lower=1, fingerprint=False)
    # gradient check
    gradcheck_examples: int = option(256, "Examples in the gradient-check batch.", lower=1, fingerprint=False,
                                     group="gradcheck")
    gradcheck_coords: int = option(20, "Finite-difference coordinates sampled per leaf.", lower=1, fingerprint=False)
    # benchmark
    bench_layer_sizes: tuple[str, ...] = option(
        ("784,10,10", "784,30,10", "784,100,10", "784,800,800,10"),
        "Networks, ';'-separated: layer sizes (784,30,10) or layer stacks (conv5x5:20,maxpool2,dense:10).",
        parse=parse_networks, fingerprint=False, group="benchmark")
    bench_batch_sizes: tuple[int, ...] = option((10, 128, 1024, 0), "Batch sizes ('full' or 0: the training set).",
                                                parse=parse_batch_sizes, fingerprint=False)
    bench_grads: tuple[str, ...] = option(BENCH_GRADS, "Gradient methods to time.", parse=parse_words,
                                          choices=BENCH_GRADS, fingerprint=False)
    bench_steps_per_call: tuple[int, ...] = option((1, 100), "Update steps per compiled call.", parse=parse_ints,
                                                   lower=1, fingerprint=False)
    bench_num_seeds: tuple[int, ...] = option((1,), "Models trained at once (vmapped) per row.", parse=parse_ints,
                                              lower=1, fingerprint=False)
    bench_sweeps: tuple[str, ...] = option(("seeds",), "How rows with K > 1 models are made: seeds (each its own data "
                                           "order), shared_seeds (--shared_data_order) or learning_rates (K rates "
                                           "around --learning_rate, one seed).", parse=parse_words,
                                           choices=BENCH_SWEEPS, fingerprint=False)
    bench_devices: tuple[int, ...] = option((), "Also time each row on these device counts (data parallel), e.g. "
                                            "1,2,4,8.", parse=parse_ints, lower=1, fingerprint=False)
    bench_repeats: int = option(5, "Timed calls per row after warm-up.", lower=1, fingerprint=False)
    bench_max_row_seconds: float = option(4.0, "Cap on the timed work of one row.", above=0, fingerprint=False)
    bench_platform: str = option("", "cpu, gpu or tpu when several are present (default: JAX's default).",
                                 choices=PLATFORMS, fingerprint=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
            _check_field(f, getattr(self, f.name))
        _check_combination(self)

    # --- derived values ---

    @property
    def learning_rates(self) -> tuple[float, ...]:
        return self.sweep_learning_rates or (self.learning_rate,)

    @property
    def num_models(self) -> int:
        return self.num_seeds * len(self.learning_rates)

    @property
    def dtype_name(self) -> str:
        """'float64' with --x64, else 'float32'. Enabling x64 is the application's job (no side effect here)."""
        return "float64" if self.x64 else "float32"

    def l2_coefficient(self, train_size: int) -> float:
        """The L2 coefficient the loss uses: l2, or l2 / n with `l2_over_train_size` (Nielsen)."""
        return self.l2 / train_size if self.l2_over_train_size else self.l2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """The inverse of to_dict, tolerant of old names and of keys this version no longer has."""
        values = {RENAMED.get(k, k): v for k, v in values.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def training_fingerprint(self) -> str:
        """What must match for a workdir to be resumed (paths and bookkeeping may differ).

        The length of training may change (to train a finished run longer) unless a schedule
        depends on it.
        """
        ignored = {f.name for f in dataclasses.fields(self) if not f.metadata["fingerprint"]}
        if self.schedule in ("constant", "exponential"):
            ignored |= {"epochs", "steps"}
        return json.dumps({k: v for k, v in self.to_dict().items() if k not in ignored}, sort_keys=True)


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(Config)


@functools.cache
def _type_hints() -> dict:
    """Config's annotations, resolved once (they are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(Config)


def element_type(f: dataclasses.Field) -> type:
    """The Python type of a field (for tuples, of its elements)."""
    hint = _type_hints()[f.name]
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0]
    return hint


def is_tuple(f: dataclasses.Field) -> bool:
    return isinstance(f.default, tuple)


def _coerce(f: dataclasses.Field, value):
    """Lists (from JSON) become tuples; ints given for float fields become floats."""
    kind = element_type(f)
    try:
        if is_tuple(f):
            if isinstance(value, str):
                return f.metadata["parse"](value)
            return tuple(kind(v) if kind is not str else v for v in value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f.name}: {e}") from None
    return value


def _describe_bounds(m: dict) -> str:
    signs = {"lower": ">=", "above": ">", "upper": "<=", "below": "<"}
    parts = [f"{sign} {m[key]:g}" for key, sign in signs.items() if m[key] is not None]
    return " and ".join(p for p in parts if p)


def _check_scalar(name: str, m: dict, kind: type, value) -> None:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return
    if kind in (int, float):
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok_type or (kind is int and not isinstance(value, int)):
            raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        lo, hi, above, below = m["lower"], m["upper"], m["above"], m["below"]
        if ((lo is not None and value < lo) or (hi is not None and value > hi)
                or (above is not None and value <= above) or (below is not None and value >= below)):
            raise ValueError(f"{name} must be {_describe_bounds(m)}, got {value:g}")
        return
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    if m["choices"] is not None and value not in m["choices"]:
        shown = ", ".join(c or "''" for c in m["choices"])
        raise ValueError(f"{name} must be one of {shown}, got {value!r}")


def _check_field(f: dataclasses.Field, value) -> None:
    kind = element_type(f)
    if is_tuple(f):
        if not isinstance(value, tuple):
            raise ValueError(f"{f.name} must be a tuple, got {value!r}")
        for v in value:
            _check_scalar(f.name, f.metadata, kind, v)
    else:
        _check_scalar(f.name, f.metadata, kind, value)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _default(name: str):
    return next(f.default for f in fields() if f.name == name)


def _check_combination(c: Config) -> None:
    """Rules that involve several fields; the per-field bounds are checked from the declarations."""
    _require(len(c.layer_sizes) >= 2 and min(c.layer_sizes) >= 1,
             f"layer_sizes needs at least an input and an output width, all >= 1, got {format_value(c.layer_sizes)}")
    if c.layer_modules or c.layers:
        from digits import layers, model  # the layer grammar lives beside the layers

        layers.import_modules(c.layer_modules)
    if c.layers:
        try:
            model.parse_layers(c.layers)
        except ValueError as e:
            raise ValueError(f"layers: {e}") from None
    _require(not (c.optimizer == "gd" and c.batch_size),
             "optimizer=gd is full-batch gradient descent: leave batch_size at 0 or use optimizer=sgd")
    _require(not (c.audit_every and c.grad != "both"), "audit_every needs grad=both")
    _require(not (c.data_source == "idx" and not c.idx_dir), "data_source=idx needs idx_dir")
    _require(len(set(c.sweep_learning_rates)) == len(c.sweep_learning_rates), "sweep_learning_rates repeats a value")
    _require(not (c.schedule == "warmup_cosine" and c.epochs == 0 and c.warmup_steps >= c.steps),
             f"warmup_steps={c.warmup_steps} must be below steps={c.steps} for warmup_cosine")
    _require(not (c.schedule == "one_cycle" and c.epochs == 0 and c.warmup_steps >= c.steps),
             f"warmup_steps={c.warmup_steps} must be below steps={c.steps} for one_cycle")
    _require(not (c.warmup_steps and c.schedule not in ("warmup_cosine", "one_cycle")),
             "warmup_steps needs schedule=warmup_cosine or one_cycle")
    _require(c.augment_elastic_alpha or c.augment_elastic_sigma == _default("augment_elastic_sigma"),
             "augment_elastic_sigma needs augment_elastic_alpha > 0")
    for name in ("one_cycle_div_factor", "one_cycle_final_div_factor"):
        _require(c.schedule == "one_cycle" or getattr(c, name) == _default(name), f"{name} needs schedule=one_cycle")
    for name in ("adam_b1", "adam_b2", "adam_eps"):
        _require(c.optimizer in ("adam", "adamw") or getattr(c, name) == _default(name),
                 f"{name} needs optimizer=adam or adamw")
    for name, value in (("target_accuracy", c.target_accuracy), ("select", c.select != "final")):
        _require(not (value and c.validation_size == 0), f"{name} needs a validation split: validation_size > 0")
    _require(not (c.decay_steps and c.schedule != "exponential"), "decay_steps needs schedule=exponential")
    _require(not (c.train_examples and c.batch_size > c.train_examples),
             f"batch_size={c.batch_size} exceeds train_examples={c.train_examples}")
    for name in ("bench_layer_sizes", "bench_batch_sizes", "bench_grads", "bench_steps_per_call", "bench_num_seeds",
                 "bench_sweeps"):
        _require(len(getattr(c, name)) > 0, f"{name} must not be empty")
    _require(min(c.bench_batch_sizes) >= 0, "bench_batch_sizes must be >= 0 ('full' or 0: the training set)")
