"""Runs a digits experiment: flags -> a frozen Config -> the chosen mode.

    python run_experiment.py --flagfile=experiments/seed_784_10_10.cfg
    python run_experiment.py --flagfile=experiments/nielsen_784_30_10.cfg --epochs=5
    python run_experiment.py --help

This is the only place that defines flags; everything else lives in the `digits` package.
"""

from __future__ import annotations

import datetime
import pathlib
import sys

import logging as python_logging

from absl import app, flags, logging

from digits import config as config_lib
from digits import data, model

FLAGS = flags.FLAGS
_defaults = config_lib.Config()

flags.DEFINE_enum("mode", "train", config_lib.MODES, "What to run.")
flags.DEFINE_string("workdir", "", "Output directory (default: a fresh timestamped folder under runs/). "
                    "Re-running train with the same workdir resumes from its last checkpoint.")
flags.DEFINE_bool("overwrite", False, "Replace a run with a different config in --workdir.")
flags.DEFINE_bool("tensorboard", False, "Also write TensorBoard event files (tensorboardX) to <workdir>/tensorboard.")
# data
flags.DEFINE_enum("dataset", _defaults.dataset, data.TFDS_DATASETS, "Dataset name (only mnist is packaged).")
flags.DEFINE_enum("data_source", _defaults.data_source, data.SOURCES,
                  "auto: TFDS if prepared in --tfds_data_dir, else the packaged MNIST; packaged; idx; tfds.")
flags.DEFINE_string("cache_dir", "", "Cache for the parsed packaged MNIST (default $XDG_CACHE_HOME/digits or ~/.cache/digits).")
flags.DEFINE_string("idx_dir", "", "Directory with the four IDX files, for --data_source=idx.")
flags.DEFINE_string("tfds_data_dir", "", "TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_bool("tfds_download", False, "Allow TFDS to download a missing dataset (needs network).")
flags.DEFINE_integer("validation_size", _defaults.validation_size, "Last N training images held out for validation.", lower_bound=0)
flags.DEFINE_integer("train_examples", 0, "Use only the first N training images (0: all).", lower_bound=0)
# model
flags.DEFINE_list("layer_sizes", list(map(str, _defaults.layer_sizes)), "Layer widths, input first: 784,30,10.")
flags.DEFINE_enum("activation", _defaults.activation, model.HIDDEN_ACTIVATIONS, "Hidden-layer activation.")
flags.DEFINE_enum("output", _defaults.output, model.OUTPUT_ACTIVATIONS, "Output activation.")
flags.DEFINE_enum("cost", _defaults.cost, model.COSTS, "Per-example cost.")
flags.DEFINE_enum("init", _defaults.init, model.INITIALIZERS,
                  "uniform: U(-scale, scale); normal: N(0,1); scaled_normal: N(0,1/n_in); glorot; he.")
flags.DEFINE_float("init_scale", _defaults.init_scale, "Half-width of the uniform initialiser.", lower_bound=0)
flags.DEFINE_float("l2", 0.0, "L2 penalty coefficient: loss += 0.5 * l2 * sum(w^2).", lower_bound=0)
flags.DEFINE_bool("l2_per_example", False, "Divide --l2 by the training-set size (Nielsen's lambda / n).")
# optimisation
flags.DEFINE_enum("grad", _defaults.grad, config_lib.GRADS,
                  "manual: hand-derived backprop; autodiff: jax.grad; both: train on manual, audit against jax.grad.")
flags.DEFINE_enum("optimizer", _defaults.optimizer, config_lib.OPTIMIZERS, "gd is full-batch gradient descent.")
flags.DEFINE_float("learning_rate", _defaults.learning_rate, "Learning rate.", lower_bound=0)
flags.DEFINE_float("momentum", _defaults.momentum, "Momentum for momentum / nesterov.", lower_bound=0, upper_bound=1)
flags.DEFINE_float("weight_decay", _defaults.weight_decay, "Decoupled weight decay for adamw.", lower_bound=0)
flags.DEFINE_enum("schedule", _defaults.schedule, config_lib.SCHEDULES, "Learning-rate schedule.")
flags.DEFINE_integer("warmup_steps", 0, "Warm-up steps for warmup_cosine.", lower_bound=0)
flags.DEFINE_float("decay_rate", _defaults.decay_rate, "Factor per --decay_steps for the exponential schedule.", lower_bound=0)
flags.DEFINE_integer("decay_steps", 0, "Steps per decay_rate factor (0: one epoch).", lower_bound=0)
flags.DEFINE_integer("batch_size", 0, "Mini-batch size (0: full batch).", lower_bound=0)
flags.DEFINE_integer("epochs", 0, "Epochs to train (0: use --steps).", lower_bound=0)
flags.DEFINE_integer("steps", _defaults.steps, "Update steps to train when --epochs=0.", lower_bound=1)
flags.DEFINE_integer("steps_per_call", 0, "Most update steps per compiled call (0: up to the next evaluation).", lower_bound=0)
flags.DEFINE_integer("eval_every", 0, "Evaluate every N steps (0: every epoch; 50 steps for full batch).", lower_bound=0)
flags.DEFINE_integer("audit_every", 0, "With --grad=both: compare manual with jax.grad every N steps.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of the initialisation and the data order.", lower_bound=0)
flags.DEFINE_bool("x64", False, "Train and check gradients in float64.")
flags.DEFINE_integer("num_seeds", 1, "Train K models (seeds seed..seed+K-1) at once with jax.vmap.", lower_bound=1)
flags.DEFINE_list("sweep_learning_rates", [], "Also vmap over these learning rates (crossed with the seeds).")
# outputs
flags.DEFINE_integer("checkpoint_every", 0, "Checkpoint every N steps (0: only at the end).", lower_bound=0)
flags.DEFINE_integer("keep_checkpoints", 3, "How many recent checkpoints to keep.", lower_bound=1)
# gradcheck
flags.DEFINE_integer("gradcheck_examples", 256, "Examples in the gradient-check batch.", lower_bound=1)
flags.DEFINE_integer("gradcheck_coords", 20, "Finite-difference coordinates sampled per leaf.", lower_bound=1)
# predict
flags.DEFINE_string("images", "", "For --mode=predict: image files and/or folders, comma-separated.")
flags.DEFINE_bool("save_preprocessed", False, "For --mode=predict: write the 28x28 inputs as PNG.")
# benchmark
flags.DEFINE_string("bench_layer_sizes", "784,10,10;784,30,10;784,100,10;784,800,800,10", "Networks, ';'-separated.")
flags.DEFINE_list("bench_batch_sizes", ["10", "128", "1024", "full"], "Batch sizes ('full': the training set).")
flags.DEFINE_list("bench_grads", ["manual", "autodiff"], "Gradient methods to time.")
flags.DEFINE_list("bench_steps_per_call", ["1", "100"], "Update steps per compiled call.")
flags.DEFINE_list("bench_num_seeds", ["1"], "Models trained at once (vmapped) per row.")
flags.DEFINE_integer("bench_repeats", 5, "Timed calls per row after warm-up.", lower_bound=1)
flags.DEFINE_float("bench_max_row_seconds", 4.0, "Cap on the timed work of one row.", lower_bound=0.01)
flags.DEFINE_string("bench_platform", "", "cpu, gpu or tpu when several are present (default: JAX's default).")


class FlagError(ValueError):
    pass


def _floats(values, name: str) -> tuple[float, ...]:
    try:
        result = tuple(float(v) for v in values)
    except ValueError:
        raise FlagError(f"--{name} must be comma-separated numbers, got {','.join(values)}") from None
    if any(v <= 0 for v in result):
        raise FlagError(f"--{name} values must be > 0")
    return result


def config_from_flags() -> config_lib.Config:
    """Validates the flags and freezes them into a Config."""
    try:
        layer_sizes = tuple(int(s) for s in FLAGS.layer_sizes)
    except ValueError:
        raise FlagError(f"--layer_sizes must be comma-separated integers, got {','.join(FLAGS.layer_sizes)}") from None
    if len(layer_sizes) < 2 or min(layer_sizes) < 1:
        raise FlagError("--layer_sizes needs at least an input and an output width, all >= 1")
    # MNIST-family datasets are 28x28 with 10 classes; IDX files may hold other shapes, which are
    # checked against the loaded data instead.
    if FLAGS.data_source != "idx" and (layer_sizes[0] != 784 or layer_sizes[-1] != 10):
        raise FlagError(f"--layer_sizes must start with 784 and end with 10 for {FLAGS.dataset}, got {','.join(map(str, layer_sizes))}")
    if FLAGS.optimizer == "gd" and FLAGS.batch_size:
        raise FlagError("--optimizer=gd is full-batch gradient descent: leave --batch_size at 0 or use --optimizer=sgd")
    if FLAGS.mode == "train" and FLAGS.audit_every and FLAGS.grad != "both":
        raise FlagError("--audit_every needs --grad=both")
    if FLAGS.data_source == "idx" and not FLAGS.idx_dir:
        raise FlagError("--data_source=idx needs --idx_dir")
    return config_lib.Config(
        dataset=FLAGS.dataset, data_source=FLAGS.data_source, cache_dir=FLAGS.cache_dir, idx_dir=FLAGS.idx_dir,
        tfds_data_dir=FLAGS.tfds_data_dir, tfds_download=FLAGS.tfds_download, validation_size=FLAGS.validation_size,
        train_examples=FLAGS.train_examples, layer_sizes=layer_sizes, activation=FLAGS.activation, output=FLAGS.output,
        cost=FLAGS.cost, init=FLAGS.init, init_scale=FLAGS.init_scale, l2=FLAGS.l2, l2_per_example=FLAGS.l2_per_example,
        grad=FLAGS.grad, optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay, schedule=FLAGS.schedule, warmup_steps=FLAGS.warmup_steps,
        decay_rate=FLAGS.decay_rate, decay_steps=FLAGS.decay_steps, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs,
        steps=FLAGS.steps, steps_per_call=FLAGS.steps_per_call, eval_every=FLAGS.eval_every,
        audit_every=FLAGS.audit_every, seed=FLAGS.seed, x64=FLAGS.x64, num_seeds=FLAGS.num_seeds,
        sweep_learning_rates=_floats(FLAGS.sweep_learning_rates, "sweep_learning_rates"),
        checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
    )


def bench_config_from_flags():
    from digits import bench

    try:
        return bench.BenchConfig(
            layer_sizes=bench.parse_layer_sizes_list(FLAGS.bench_layer_sizes),
            batch_sizes=bench.parse_batch_sizes(",".join(FLAGS.bench_batch_sizes)),
            grads=bench.parse_grads(",".join(FLAGS.bench_grads)),
            steps_per_call=bench.parse_positive_ints(",".join(FLAGS.bench_steps_per_call), "--bench_steps_per_call"),
            num_seeds=bench.parse_positive_ints(",".join(FLAGS.bench_num_seeds), "--bench_num_seeds"),
            repeats=FLAGS.bench_repeats,
            platform=FLAGS.bench_platform, x64=FLAGS.x64, max_row_seconds=FLAGS.bench_max_row_seconds,
        )
    except (ValueError, TypeError) as e:
        raise FlagError(f"bad benchmark flags: {e}") from None


def workdir_from_flags(mode: str) -> pathlib.Path:
    if FLAGS.workdir:
        return pathlib.Path(FLAGS.workdir)
    if mode in ("eval", "predict"):
        raise FlagError(f"--mode={mode} needs --workdir pointing at a training run")
    return pathlib.Path("runs") / f"{mode}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def run(mode: str) -> int:
    from digits import experiment

    workdir = workdir_from_flags(mode)
    if mode == "train":
        experiment.run_train(config_from_flags(), workdir, overwrite=FLAGS.overwrite, tensorboard=FLAGS.tensorboard)
    elif mode == "gradcheck":
        summary = experiment.run_gradcheck(config_from_flags(), workdir, FLAGS.gradcheck_examples, FLAGS.gradcheck_coords)
        return 0 if summary["passed"] else 1
    elif mode == "eval":
        experiment.run_eval(workdir)
    elif mode == "predict":
        if not FLAGS.images:
            raise FlagError("--mode=predict needs --images=a.png,b.jpg or a folder")
        _, failures = experiment.run_predict(workdir, FLAGS.images, FLAGS.save_preprocessed)
        return 1 if failures else 0
    else:
        experiment.run_benchmark(config_from_flags(), bench_config_from_flags(), workdir)
    return 0


def main(argv) -> int:
    python_logging.getLogger("jax._src.xla_bridge").setLevel(python_logging.WARNING)  # no libtpu noise
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from digits import experiment

    try:
        return run(FLAGS.mode)
    except (FlagError, experiment.UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, FlagError) else 1
    except OSError as e:  # unwritable workdir, full disk, ...: say which file, no traceback
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except experiment.Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parse_flags(argv):
    """absl's parser, but a bad flag is one line on stderr and exit status 2 (no banner, no traceback)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=parse_flags)
