"""The application layer: runs one mode of `run_experiment.py` from a frozen Config.

Unlike the rest of the library this module talks to a person (printed lines, a progress bar,
tables) and owns the work directory. Every mode writes files of its own names (`OUTPUTS`) and
never another's: training owns config.json, metrics, summary, plots and checkpoints; gradcheck,
eval, predict and benchmark write beside them. The training loop itself is `train.fit`; this
module plugs its hooks in. It never reads flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from digits import (
    bench,
    checkpoint,
    compiling,
    data,
    files,
    gradcheck,
    model,
    parallel,
    predict,
    report,
    results,
    train,
)
from digits import config as config_lib
from digits.config import Config

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"  # --select=best_validation: the state of each model's best validation accuracy
GRADCHECK_FILE = "gradcheck.json"
EVAL_FILE = "eval.json"
EVAL_CONFUSION_FILE = "eval_confusion_matrix.png"
PREDICTIONS_FILE = "predictions.json"
PREPROCESSED_DIR = "preprocessed"
ENSEMBLE = "ensemble"  # --model=ensemble: every model of the run, their output probabilities averaged
# What each mode writes in a workdir. No mode writes another's names; --overwrite removes these
# (and nothing else) before a new training run starts.
OUTPUTS = {
    "train": (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, "learning_curves.png", "confusion_matrix.png",
              "misclassified.png", "tensorboard", CHECKPOINT_DIR, BEST_DIR),
    "gradcheck": (GRADCHECK_FILE,),
    "eval": (EVAL_FILE, EVAL_CONFUSION_FILE),
    "predict": (PREDICTIONS_FILE, PREPROCESSED_DIR),
    "benchmark": bench.OUTPUT_FILES,
}


class UsageError(Exception):
    """A problem the user can fix; the CLI prints its one-line message and exits 1."""


class ConfigError(UsageError):
    """A setting that does not fit: the data, the devices or the work directory (a different run
    there, a run longer than asked, no checkpoint for eval). The CLI exits 2, as for a bad flag."""


class TrainingDiverged(UsageError):
    pass


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) during training: a checkpoint was saved."""


def precision(config: Config):
    """float64 for the duration of a mode when the config asks for it (no global side effect)."""
    return jax.enable_x64(True) if config.x64 else contextlib.nullcontext()


# --- the work directory ---------------------------------------------------------------------------


def _sync(name: str) -> None:
    """In a multi-process run, every process waits here for the others (process 0 writes)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _is_output(name: str) -> bool:
    """A file or folder some mode writes, or a temporary file of one (`files.atomic_open`)."""
    names = {n for mode in OUTPUTS.values() for n in mode}
    return name in names or any(name.startswith(f".{n}.") and name.endswith(".tmp") for n in names)


def outputs_in(workdir: pathlib.Path) -> tuple[list[str], list[str]]:
    """(digits outputs, other entries) of a workdir, sorted by name."""
    entries = sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else []
    return [n for n in entries if _is_output(n)], [n for n in entries if not _is_output(n)]


def _listing(names: list[str], workdir: pathlib.Path) -> str:
    return ", ".join(n + ("/" if (workdir / n).is_dir() else "") for n in names)


def remove_outputs(workdir: pathlib.Path) -> list[str]:
    """Deletes every digits output in `workdir` (of every mode) and nothing else; returns their names."""
    removed, _ = outputs_in(workdir)
    for name in removed:
        path = workdir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    return removed


def read_workdir_config(workdir: pathlib.Path) -> Config:
    """The config of the training run in `workdir` (its config.json)."""
    path = workdir / CONFIG_FILE
    if not workdir.exists():
        raise ConfigError(f"--workdir {workdir} does not exist")
    if not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is not a directory")
    try:
        return Config.from_dict(json.loads(path.read_text())["config"])
    except FileNotFoundError:
        raise ConfigError(f"{workdir} holds no training run (no {CONFIG_FILE}); pass the --workdir of one") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is unreadable ({' '.join(str(e).split())}); pass another --workdir") from None


def is_training_run(workdir: pathlib.Path) -> bool:
    return (workdir / CONFIG_FILE).is_file()


def run_config(workdir: pathlib.Path, given: dict | None = None) -> Config:
    """The config of the run in `workdir`, for the modes that use a trained model (eval, predict,
    gradcheck): `given` values that only say where and how (data locations, devices, gradient-
    check sizes: the fields outside the fingerprint) apply; one that would describe another
    model or training is a ConfigError, never silently ignored."""
    config = read_workdir_config(workdir)
    changed = {k: v for k, v in (given or {}).items() if getattr(config, k) != v}
    fingerprinted = {f.name for f in config_lib.fields() if f.metadata["fingerprint"]}
    fixed = sorted(k for k in changed if k in fingerprinted)
    if fixed:
        shown = ", ".join(f"{k}={config_lib.format_value(changed[k])} (the run's: "
                          f"{config_lib.format_value(getattr(config, k))})" for k in fixed)
        raise ConfigError(f"{workdir} was trained with other values: {shown}; this mode uses the run's own "
                          "config: drop those flags or pass the --workdir of another run")
    return dataclasses.replace(config, **changed)


def prepare_workdir(workdir: pathlib.Path, config: Config, extra: dict) -> None:
    """Creates the workdir and writes this run's config.json (checked by `_existing_run` first)."""
    if parallel.is_primary():  # in a multi-process run, process 0 writes; every process checks
        workdir.mkdir(parents=True, exist_ok=True)
        report.write_json(workdir / CONFIG_FILE, {"config": config.to_dict(), **report.environment(), **extra})
    _sync("workdir prepared")  # nobody looks for checkpoints while process 0 may be writing


# --- data ---------------------------------------------------------------------------------------


def load_dataset(config: Config) -> data.Dataset:
    """The dataset the config names, with its validation split, as uint8 arrays."""
    try:
        dataset = data.load(
            config.data_source, config.dataset, cache_dir=config.cache_dir or None, idx_dir=config.idx_dir or None,
            tfds_data_dir=config.tfds_data_dir or None, tfds_download=config.tfds_download,
        )
        dataset = data.split_validation(dataset, config.validation_size)
    except data.DataNotFound as e:  # a setting names data that is not there
        raise ConfigError(str(e)) from None
    except data.DataError as e:  # the data is there but broken
        raise UsageError(str(e)) from None
    if config.train_examples:
        if config.train_examples > len(dataset.train):
            raise ConfigError(f"train_examples={config.train_examples} exceeds the {len(dataset.train)} training "
                              "images")
        n = config.train_examples
        dataset = dataclasses.replace(dataset, train=data.Split(dataset.train.images[:n], dataset.train.labels[:n]))
    if config.expand_shifts:  # after the validation split: no shifted copy of a validation image is trained on
        try:
            dataset = dataclasses.replace(dataset, train=data.expand_by_shifts(dataset.train))
        except data.DataError as e:
            raise ConfigError(str(e)) from None
    return dataset


def make_plan(config: Config, dataset: data.Dataset) -> train.Plan:
    """train.Plan.create, with a config that does not fit the data or the devices as a one-line
    ConfigError. `--grad=both` without `--audit_every` audits at every evaluation."""
    try:
        plan = train.Plan.create(config, dataset)
        if config.grad == "both" and not config.audit_every:
            plan = train.Plan.create(dataclasses.replace(config, audit_every=plan.eval_every), dataset)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_classes(plan.spec, config, dataset)
    return plan


def check_classes(spec: model.ModelSpec, config: Config, dataset: data.Dataset) -> None:
    """The output has one unit per class: a wider one would learn classes that never occur."""
    if spec.num_classes != dataset.num_classes:
        given = (f"layers={config.layers}" if config.layers
                 else f"layer_sizes={config_lib.format_value(config.layer_sizes)}")
        raise ConfigError(f"{given} has {spec.num_classes} outputs but {dataset.name} has {dataset.num_classes} "
                          f"classes: the last layer must have {dataset.num_classes} units")


# --- progress -----------------------------------------------------------------------------------


class Progress:
    """A tqdm bar when stderr is a terminal, plain absl log lines otherwise (CI, files)."""

    def __init__(self, total: int, initial: int, unit: str = "step"):
        self.bar = None
        self.quiet = not parallel.is_primary()  # one progress report per run, not one per process
        if sys.stderr.isatty() and not self.quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True)
        self.position = initial
        self.unit = unit

    def update(self, position: int, fields: dict) -> None:
        if self.quiet:
            return
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


def gradient_batch(dataset: data.Dataset, spec: model.ModelSpec, dtype, examples: int):
    """The first `examples` training images as a (x, labels) batch for gradient checks."""
    n = min(examples, len(dataset.train))
    return _batch_inputs(dataset.train.images[:n], spec, dtype), jnp.asarray(dataset.train.labels[:n])


# One program: run op by op, model.inputs's three operations compile one by one (0.2 s).
_batch_inputs = compiling.jit(model.inputs, static_argnames=("spec", "dtype"))


def initial_gradient_check(params, dataset: data.Dataset, spec: model.ModelSpec, dtype, examples: int = 1000) -> dict:
    """Manual vs jax.grad on the first training examples, at the initial params."""
    batch = gradient_batch(dataset, spec, dtype, examples)
    key = jax.random.PRNGKey(0) if spec.has_dropout else None
    reports = gradcheck.against_autodiff(params, batch, spec, dropout_key=key)
    n = int(batch[1].shape[0])
    print(f"Gradient check at init, manual backprop vs jax.grad on {n} examples ({jnp.dtype(dtype).name}):")
    print(gradcheck.format_reports(reports))
    passed = gradcheck.verdict(reports)
    print(f"Gradient check: {'PASS' if passed else 'FAIL'}\n", flush=True)
    return {"passed": passed, "max_relative_error": max(r.relative_error for r in reports), "examples": n}


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """On resume, drop records a killed run logged after its last checkpoint."""
    if path.exists() and parallel.is_primary():
        kept = [r for r in report.read_metrics(path) if r.get("step", 0) <= step]
        with files.atomic_open(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))


# What each part of a run (one command that trained it) records of its time; a run's timings
# are their sums, so they add up across resumes. Its peak memory (peak_rss_bytes) is a maximum.
PART_TIMINGS = ("compile_s", "eval_compile_s", "train_s", "eval_s", "data_s", "gradcheck_s", "plot_s", "steps_timed",
                "total_s")


def _fold_audits(audits: list[dict]) -> dict:
    """The manual-vs-jax.grad audit of several parts as one: checks add up, worst errors stay."""
    worst = {k: max(a.get(k, 0.0) for a in audits) for k in ("max_violation", "max_relative_error", "max_abs_error")}
    return {"count": sum(a.get("count", 0) for a in audits), **worst,
            "passed": all(a.get("passed", True) for a in audits)}


def _total_timings(parts: list[dict], plan: train.Plan) -> dict:
    # (None: no part recorded it, as runs of an earlier version did not time data and the check)
    sums = {k: sum(p.get(k) or 0 for p in parts) if any(k in p for p in parts) else None for k in PART_TIMINGS}
    per_step = sums["train_s"] / sums["steps_timed"] if sums["steps_timed"] else None
    peaks = [p["peak_rss_bytes"] for p in parts if p.get("peak_rss_bytes")]
    return {**sums, "peak_rss_bytes": max(peaks) if peaks else None, "seconds_per_step": per_step,
            "seconds_per_epoch": per_step * plan.steps_per_epoch if per_step else None,
            "examples_per_s": plan.batch_size * plan.config.num_models / per_step if per_step else None}


class _WorkdirHooks(train.Hooks):
    """What a command-line run does between chunks: checkpoints (with the run's record so far:
    the gradient check at init and the parts before this one), Ctrl-C, metrics, progress."""

    def __init__(self, plan: train.Plan, workdir: pathlib.Path, step: int, last_checkpoint, stop: dict,
                 metrics: report.MetricsWriter, tensorboard: bool, record: dict,
                 best: train.BestValidation | None = None, clock: dict | None = None, started: float | None = None):
        self.plan, self.ckpt_dir, self.stop = plan, workdir / CHECKPOINT_DIR, stop
        self.best, self.best_dir = best, workdir / BEST_DIR
        self.last_checkpoint, self.metrics = last_checkpoint, metrics
        self.progress = Progress(plan.total_steps, step)
        self.tb = report.TensorBoardWriter(workdir / "tensorboard") if tensorboard and metrics else None
        self.record, self.start_step, self.audit = record, step, None
        # clock: this command's timings so far, which fit keeps up to date; started: when it began
        self.clock, self.started = {} if clock is None else clock, time.perf_counter() if started is None else started

    def part(self, step: int) -> dict:
        """This command's part of the run up to `step`, with its timings so far (`clock`: fit's,
        and data_s, gradcheck_s): what a checkpoint records, so that a part that never finishes
        (stopped, killed) still counts. A finished part's come with the summary."""
        part = {"start_step": self.start_step, "end_step": step, "total_steps": self.plan.total_steps,
                "date": datetime.date.today().isoformat(), **self.clock,
                "total_s": time.perf_counter() - self.started, "interrupted": True}
        return part if self.audit is None else {**part, "grad_audit": self.audit}

    def save(self, step: int, state) -> None:
        metadata = {**self.record, "parts": self.record["parts"] + [self.part(step)]}
        checkpoint.save(self.ckpt_dir, step, state, metadata, self.plan.config.keep_checkpoints)
        self.last_checkpoint = step

    def stop_requested(self) -> bool:
        """Ctrl-C or SIGTERM here, or (several processes) in any process: all must stop at the
        same step, or the others would wait forever in the next collective."""
        requested = self.stop["signal"] is not None
        if jax.process_count() == 1:
            return requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(requested))))

    def after_chunk(self, step, state):
        every = self.plan.config.checkpoint_every
        stopping = self.stop_requested()
        if every and step % every == 0 or stopping:
            self.save(step, state)
        if stopping:
            raise Interrupted(f"interrupted at step {step}; checkpoint saved in {self.ckpt_dir}; "
                              "re-run the same command to resume")

    def after_eval(self, step, state, record):
        # A split that does not exist (--validation_size=0) has no metrics, rather than NaN ones.
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}
        audit = {k[len("grad_audit_"):]: v for k, v in record.items() if k.startswith("grad_audit_")}
        self.audit = audit or None
        if self.metrics:
            self.metrics.write(record)
        if self.tb:
            self.tb.scalars(step, record)
        self.progress.update(step, {"loss": record["loss"], "val_acc": record.get("validation_accuracy")})
        if self.best is not None and self.best.changed:  # before the checkpoint of this step, as the metrics
            checkpoint.save(self.best_dir, step, self.best.state, self.best.to_dict(), keep=1)

    def model_diverged(self, lane, error):
        logging.warning("model %d: %s; the other models go on", lane, error)

    def diverged(self, error: train.Diverged) -> TrainingDiverged:
        kept = (f"the last good checkpoint (step {self.last_checkpoint}) is intact in {self.ckpt_dir}"
                if self.last_checkpoint is not None else "no checkpoint was written")
        return TrainingDiverged(f"{error}; {kept}; try a smaller --learning_rate")

    def close(self):
        self.progress.close()
        if self.tb:
            self.tb.close()


def network_text(plan: train.Plan) -> str:
    """The network as the run header says it: 784-30-10 relu/softmax/cross_entropy for the dense
    shorthand, else the effective stack (implicit activations written in) and output/cost."""
    c = plan.config
    if not c.layers:
        return f"{'-'.join(map(str, c.layer_sizes))} {c.activation}/{c.output}/{c.cost}"
    return f"{plan.spec.effective_text} {c.output}/{c.cost}"


def describe(plan: train.Plan, dataset: data.Dataset) -> str:
    c = plan.config
    return (f"{dataset.name} ({dataset.source}): {len(dataset.train)} train, {len(dataset.validation)} validation, "
            f"{len(dataset.test)} test; {network_text(plan)}; {c.optimizer} lr "
            f"{','.join(map(str, c.learning_rates))}; grad={c.grad}; {c.num_models} model(s); {plan.total_steps} steps "
            f"on {jax.devices()[0].device_kind}, {plan.layout.describe()}"
            + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""))


def run_train(config: Config, workdir: pathlib.Path, *, overwrite: bool = False, tensorboard: bool = False,
              final_outputs: dict | None = None) -> dict:
    """Trains, resumes or extends a run in `workdir` and writes metrics, checkpoints, plots and
    summary; a finished run is reported from its files and left as it is. final_outputs: a dict
    that receives the final model's evaluation (`Evaluator.splits`: predictions and output
    probabilities among them), from this call's training (train_subset, validation and test)
    or, for a finished run, from its final checkpoint (validation and test)."""
    with precision(config), _workdir_lock(workdir):
        return _train(config, workdir, overwrite, tensorboard, final_outputs)


def _open_directory(path: pathlib.Path) -> int | None:
    """A read-only descriptor of the directory `path` (created if missing), or None where that
    fails (a file there, no permission: the command reports it where it writes)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path):
    """An exclusive lock on the workdir (flock on the directory itself, so no file is left) for
    the command's duration: a second process training the same run, which would interleave
    checkpoints, metrics and summaries, is refused instead. The primary process takes it (the
    others of a multi-process run write nothing); file systems without flock go unlocked."""
    fd = _open_directory(workdir) if parallel.is_primary() else None
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another process is training the run in {workdir}: wait for it to finish, or "
                             "choose another --workdir") from None
        except OSError:
            pass  # (no flock here, e.g. some network file systems)
        yield
    finally:
        os.close(fd)


def _length(config: Config, steps: int) -> str:
    return f"--epochs={config.epochs} ({steps} steps)" if config.epochs else f"--steps={steps}"


@dataclasses.dataclass(frozen=True)
class _Existing:
    """What a workdir already holds of the run a config asks for."""

    step: int | None = None  # the latest checkpoint (None: nothing to resume)
    total: int | None = None  # the run's length before this command
    summary: dict | None = None  # summary.json, when it is the record of `step`

    def parts(self, metadata: dict) -> list[dict]:
        """The parts of the run before this command: the summary's if it is the record of the
        checkpoint, else those the checkpoint carries (an interrupted part has no exact timings)."""
        if self.step is None:
            return []
        if self.summary is not None:
            return self.summary.get("parts") or [{"start_step": 0, "end_step": self.step, "total_steps": self.step,
                                                  **{k: self.summary["timings"].get(k) for k in PART_TIMINGS}}]
        return metadata.get("parts") or [{"start_step": 0, "end_step": self.step, "unrecorded": True}]


def _latest_checkpoint(workdir: pathlib.Path) -> int | None:
    return _latest_checkpoint_in(workdir / CHECKPOINT_DIR)


def _latest_checkpoint_in(directory: pathlib.Path) -> int | None:
    try:
        return checkpoint.latest_step(directory)
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None


def _read_summary(workdir: pathlib.Path) -> dict | None:
    try:
        summary = json.loads((workdir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("mode") == "train" else None


def _existing_run(workdir: pathlib.Path, config: Config, plan: train.Plan) -> _Existing:
    """Checks that `workdir` holds this run (or none) and no more of it than asked: another
    config there, or a run longer than `plan`, is a ConfigError."""
    if not is_training_run(workdir):
        return _Existing(_latest_checkpoint(workdir))
    old = read_workdir_config(workdir)
    old_values, new_values = json.loads(old.training_fingerprint()), json.loads(config.training_fingerprint())
    if old_values != new_values:
        differs = sorted(k for k in old_values.keys() | new_values.keys() if old_values.get(k) != new_values.get(k))
        why = (f"; schedule={config.schedule} depends on the run's length, so it cannot change"
               if set(differs) <= {"epochs", "steps"} else "")
        outputs, others = outputs_in(workdir)
        kept = f" and keeps {_listing(others, workdir)}" if others else ""
        raise ConfigError(f"{workdir} holds a run with a different config ({', '.join(differs)} differ{why}); pass "
                          f"--overwrite to start afresh there (it removes {_listing(outputs, workdir)}{kept}) or "
                          "choose another --workdir")
    step, total = _latest_checkpoint(workdir), train.total_steps(old, plan.train_size)
    if step is not None and step > plan.total_steps:
        raise ConfigError(f"{workdir} has trained {step} steps and this config asks for "
                          f"{_length(config, plan.total_steps)}: a run cannot be shortened; pass its own "
                          f"{_length(old, total)} or more to extend it, or another --workdir")
    summary = _read_summary(workdir)
    return _Existing(step, total, summary if summary is not None and summary.get("steps") == step else None)


def _at_target(summary: dict, config: Config) -> bool:
    """The run stopped where it reached a target at least as high as the config's."""
    target = summary.get("target") or {}
    return bool(config.target_accuracy and target.get("reached") and target["step"] == summary["steps"]
                and target["validation_accuracy"] >= config.target_accuracy)


def _restore_best(workdir: pathlib.Path, plan: train.Plan, resuming: bool) -> train.BestValidation:
    """The best-validation tracker of a run: empty for a fresh one, else as its last save left it."""
    best_dir = workdir / BEST_DIR
    if not resuming or _latest_checkpoint_in(best_dir) is None:
        return train.BestValidation(plan.config.num_models)
    try:
        state, saved = checkpoint.restore(best_dir, plan.init_state())
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    return train.BestValidation(plan.config.num_models, state, saved["validation_accuracy"], saved["step"])


def _best_summary(plan: train.Plan, dataset: data.Dataset, best: train.BestValidation, found: dict) -> dict:
    """summary.json's best_validation: each model at its best validation accuracy (means over the
    models; per model under across_models)."""
    steps = best.step.tolist()
    metrics = train.split_metrics(found)
    out = {"step": steps[0] if not plan.vmapped else steps, "epoch": steps[0] / plan.steps_per_epoch,
           **{k: train.mean_over_models(v) for k, v in metrics.items()}}
    if plan.vmapped:
        out["epoch"] = [s / plan.steps_per_epoch for s in steps]
        out["across_models"] = {k: train.summarise(np.where(best.step < 0, np.nan, v)) for k, v in metrics.items()}
        out["ensemble"] = ensemble_summary(found, dataset, best.step >= 0)
    return out


def ensemble_summary(found: dict, dataset: data.Dataset, keep) -> dict:
    """{"models", "<split>_accuracy"}: the ensemble of the kept models (bool (K,)), the mean of
    their output probabilities, on each split `found` (`Evaluator.splits` of K models) holds."""
    out = {"models": int(np.sum(keep))}
    for name in ("validation", "test"):
        if f"{name}_probabilities" in found:
            out[f"{name}_accuracy"] = train.ensemble_accuracy(found[f"{name}_probabilities"],
                                                              getattr(dataset, name).labels, keep)
    return out


def _target_summary(plan: train.Plan, parts: list[dict]) -> dict | None:
    """summary.json's target: where the config's --target_accuracy was first reached (by a part
    that stopped at it or at a higher one; with none, where any part's target was), and the run's
    time up to there (the parts up to that one); None when no part had a target."""
    target = plan.config.target_accuracy
    for i, part in enumerate(parts):
        if part.get("target") and part["target"]["validation_accuracy"] >= target:
            # The time to the printed result: the figures drawn after it are not counted.
            reached = {**part, "total_s": part.get("result_s", part.get("total_s"))}
            times = _total_timings(parts[:i] + [reached], plan)
            t = part["target"]
            return {"accuracy": t["accuracy"], "reached": True, "step": t["step"],
                    "epoch": t["step"] / plan.steps_per_epoch, "validation_accuracy": t["validation_accuracy"],
                    **{k: times[k] for k in ("train_s", "eval_s", "compile_s", "eval_compile_s", "total_s")}}
    return {"accuracy": target, "reached": False} if target else None


def _train(config: Config, workdir: pathlib.Path, overwrite: bool, tensorboard: bool,
           final_outputs: dict | None = None) -> dict:
    started = time.perf_counter()
    dataset = load_dataset(config)
    plan = make_plan(config, dataset)
    data_s, gradcheck_s = time.perf_counter() - started, 0.0
    if overwrite:
        removed = remove_outputs(workdir) if parallel.is_primary() else []
        if removed:
            print(f"Removed the old run's outputs from {workdir}: {', '.join(removed)}", flush=True)
        _sync("old outputs removed")
    existing = _existing_run(workdir, config, plan)
    if existing.summary is not None and (existing.step == plan.total_steps or _at_target(existing.summary, config)):
        at = ("" if existing.step == plan.total_steps else
              f", stopped at --target_accuracy={config.target_accuracy:g}; a higher one or none trains on")
        print(f"{workdir} holds a finished run ({existing.step} of {plan.total_steps} steps{at}): nothing to do, "
              "nothing changed. A larger --epochs or --steps extends it; --overwrite starts afresh. Its results:")
        _print_final(existing.summary, workdir)
        if final_outputs is not None:
            final_outputs.update(_evaluate_final(plan, dataset, workdir))
        return existing.summary
    prepare_workdir(workdir, config, {"train_size": len(dataset.train), "data_source": dataset.source,
                                      "mesh": plan.layout.to_dict()})
    ckpt_dir = workdir / CHECKPOINT_DIR
    print(describe(plan, dataset), flush=True)

    host_state = plan.init_state(placed=False)
    state, metadata = plan.place(host_state), {}
    if existing.step is not None:
        try:  # onto this run's mesh, whatever the saving run's
            state, metadata = checkpoint.restore(ckpt_dir, state)
        except checkpoint.CheckpointError as e:
            raise UsageError(str(e)) from None
    gradient_check = metadata.get("gradient_check_at_init")
    if gradient_check is None:  # once per run: a resume reads it from the checkpoint
        first_params = jax.tree.map(lambda x: x[0], host_state.params) if plan.vmapped else host_state.params
        checking = time.perf_counter()
        gradient_check = initial_gradient_check(first_params, dataset, plan.spec, plan.dtype)
        gradcheck_s = time.perf_counter() - checking
    else:
        print(f"Gradient check at init: {'PASS' if gradient_check['passed'] else 'FAIL'} (checked when the run "
              f"started, on {gradient_check['examples']} examples; not repeated on resume)\n", flush=True)
    step = train.host_step(state)
    if existing.step is not None:
        print(f"Resuming from the checkpoint at step {step} in {ckpt_dir}"
              + (f"; the run's length changes from {existing.total} to {plan.total_steps} steps (a new part in "
                 f"{SUMMARY_FILE})" if existing.total not in (None, plan.total_steps) else ""), flush=True)
    _truncate_metrics(workdir / METRICS_FILE, step)
    record = {"fingerprint": config.training_fingerprint(), "gradient_check_at_init": gradient_check,
              "parts": existing.parts(metadata)}

    best = _restore_best(workdir, plan, existing.step is not None) if config.select == "best_validation" else None
    device = train.device_splits(dataset, plan.layout, config.train_accuracy_examples)
    metrics_file = report.MetricsWriter(workdir / METRICS_FILE) if parallel.is_primary() else contextlib.nullcontext()
    with stop_requests() as stop:  # to the final checkpoint: a signal stops the run at a saved state
        with metrics_file as metrics:
            clock = {"data_s": data_s, "gradcheck_s": gradcheck_s}
            hooks = _WorkdirHooks(plan, workdir, step, existing.step, stop, metrics, tensorboard, record, best, clock,
                                  started)
            try:
                result = train.fit(plan, state, device, [hooks], best, clock)
            except train.Diverged as e:
                raise hooks.diverged(e) from None
            finally:
                hooks.close()
        end = train.host_step(result.state)  # below total_steps when --target_accuracy stopped it
        try:  # the final evaluation, then the final checkpoint, whatever happens in between
            final = result.final_splits(device, ("train_subset", "validation", "test"))
            if final_outputs is not None:
                final_outputs.update(final)
            best_found = None
            if best is not None and best.state is not None:
                best_params, best_model_state = train.reported_model(best.state)
                best_found = result.evaluator.splits(best_params, device, ("validation", "test"), best_model_state)
            first_predictions = final["test_predictions"][0] if plan.vmapped else final["test_predictions"]
            cm = report.confusion_matrix(dataset.test.labels, first_predictions, plan.spec.num_classes)
            timings = result.timings(plan)
            part = {"start_step": step, "end_step": end, "total_steps": plan.total_steps,
                    "date": datetime.date.today().isoformat(), **{k: timings[k] for k in PART_TIMINGS if k in timings},
                    "data_s": data_s, "gradcheck_s": gradcheck_s}
            part["result_s"] = part["total_s"] = time.perf_counter() - started  # (total_s: until the figures are drawn)
            if result.target is not None:
                part["target"] = {"accuracy": config.target_accuracy, **result.target}
            if plan.config.grad == "both":
                part["grad_audit"] = result.audit
            parts = record["parts"] + [part]
            summary = _final_summary(plan, dataset, workdir, result, final, gradient_check, parts, cm)
            if best_found is not None:
                summary["best_validation"] = _best_summary(plan, dataset, best, best_found)
            _print_results(summary)  # before the final checkpoint and the figures: files, not the result
        finally:
            if hooks.last_checkpoint != end:
                hooks.save(end, result.state)
    if stop["signal"] is not None:  # it came during the final evaluation: stop there, having saved
        raise Interrupted(f"interrupted after the last step ({end}); checkpoint saved in {workdir / CHECKPOINT_DIR}; "
                          "re-run the same command to finish the run (its evaluation and summary)")
    plotting = time.perf_counter()
    if parallel.is_primary():
        _plot_run(dataset, workdir, first_predictions, cm)
    part.update(plot_s=time.perf_counter() - plotting, total_s=time.perf_counter() - started,
                peak_rss_bytes=report.peak_rss_bytes())
    summary["timings"] = _total_timings(summary["parts"], plan)
    if parallel.is_primary():
        report.write_json(workdir / SUMMARY_FILE, summary)
    _print_timings(summary, workdir)
    return summary


def _evaluate_final(plan: train.Plan, dataset: data.Dataset, workdir: pathlib.Path) -> dict:
    """`Evaluator.splits` of a finished run's final model (its latest checkpoint, whatever
    --select reports) on validation and test, as its training's final evaluation gave them."""
    try:
        state, _ = checkpoint.restore(workdir / CHECKPOINT_DIR, plan.init_state())
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    params, model_state = train.reported_model(state)
    evaluator = train.Evaluator(plan.spec, plan.dtype, vmapped=plan.vmapped, layout=plan.layout)
    return evaluator.splits(params, train.device_splits(dataset, plan.layout), ("validation", "test"), model_state)


def _plot_run(dataset: data.Dataset, workdir: pathlib.Path, first_predictions, cm) -> None:
    """The run's figures: the first model's test confusion matrix `cm` (C, C) and misclassified
    digits (its test predictions (N,)), and the learning curves of metrics.jsonl."""
    report.plot_confusion_matrix(cm, workdir / "confusion_matrix.png")
    report.plot_misclassified(dataset.test.images, dataset.test.labels, first_predictions,
                              workdir / "misclassified.png")
    report.plot_learning_curves(report.read_metrics(workdir / METRICS_FILE), workdir / "learning_curves.png")


def _final_summary(plan: train.Plan, dataset: data.Dataset, workdir, result: train.FitResult, final: dict,
                   gradient_check: dict, parts: list[dict], cm: np.ndarray) -> dict:
    """cm: the first model's test confusion matrix."""
    metrics = train.split_metrics(final)
    if plan.vmapped:
        metrics = {k: np.where(result.diverged, np.nan, v) for k, v in metrics.items()}
    steps = train.host_step(result.state)
    summary = {
        "mode": "train",
        "config": plan.config.to_dict(),
        "environment": report.environment(),
        "steps": steps,
        "epochs": steps / plan.steps_per_epoch,
        "num_models": plan.config.num_models,
        "mesh": plan.layout.to_dict(),
        "final": {k: train.mean_over_models(v) for k, v in metrics.items()},
        "per_class_test_accuracy": report.per_class_accuracy(cm).tolist(),
        "gradient_check_at_init": gradient_check,
        "parts": parts,
        "extended": any(p.get("total_steps", steps) < steps for p in parts),
        "timings": _total_timings(parts, plan),
    }
    target = _target_summary(plan, parts)
    if target is not None:
        summary["target"] = target
    audits = [p["grad_audit"] for p in parts if "grad_audit" in p]
    if audits:
        summary["grad_audit"] = _fold_audits(audits)
    if plan.vmapped:
        summary["models"] = [dict(lane, diverged=bool(result.diverged[i])) for i, lane in enumerate(plan.model_lanes())]
        summary["across_models"] = {k: train.summarise(v) for k, v in metrics.items()}
        summary["ensemble"] = ensemble_summary(final, dataset, ~result.diverged)
    return summary


def _print_final(summary: dict, workdir: pathlib.Path) -> None:
    _print_results(summary)
    _print_timings(summary, workdir)


def _print_results(summary: dict) -> None:
    """The run's accuracies (final, ensemble, best validation, target, gradient audit)."""
    final, across = summary["final"], summary.get("across_models")
    print()
    for label, key in (("Validation accuracy", "validation_accuracy"), ("Test accuracy", "test_accuracy")):
        name = f"{label}:".ljust(21)
        if key not in final:
            print(f"{name}none (no validation split: validation_size=0)")
        elif across:
            d = across[key]
            diverged = sum(m["diverged"] for m in summary.get("models", []))
            print(f"{name}{d['mean']:.4f} ± {d['std']:.4f}, mean ± std over {summary['num_models'] - diverged} models "
                  f"(min {d['min']:.4f}, max {d['max']:.4f})"
                  + (f"; {diverged} diverged, left out" if diverged else ""))
        else:
            print(f"{name}{final[key]:.4f}")
    if "ensemble" in summary and summary["ensemble"]["models"] > 1:
        e = summary["ensemble"]
        found = ", ".join(f"{split} accuracy {e[f'{split}_accuracy']:.4f}" for split in ("test", "validation")
                          if f"{split}_accuracy" in e)
        print(f"{'Ensemble:'.ljust(21)}{found} (the mean of the {e['models']} models' output probabilities)")
    if "best_validation" in summary:
        b = summary["best_validation"]
        where = (f"step {b['step']} (epoch {b['epoch']:.3g})" if not isinstance(b["step"], list)
                 else f"steps {', '.join(map(str, b['step']))}")
        print(f"{'Best validation:'.ljust(21)}{b['validation_accuracy']:.4f} at {where}; test accuracy there "
              f"{b['test_accuracy']:.4f} (final {final['test_accuracy']:.4f})"
              + ("; mean over models" if isinstance(b["step"], list) else "")
              + (f"; their ensemble {b['ensemble']['test_accuracy']:.4f}" if b.get("ensemble", {}).get("models", 0) > 1
                 else ""))
    if "target" in summary:
        t = summary["target"]
        print(f"{'Target:'.ljust(21)}" + (
            f"validation accuracy {t['validation_accuracy']:.4f} >= {t['accuracy']:g} at step {t['step']} (epoch "
            f"{t['epoch']:.3g}), after {t['train_s']:.2f} s of training, {t['total_s']:.2f} s in all"
            if t["reached"] else f"validation accuracy {t['accuracy']:g} not reached"))
    if "grad_audit" in summary:
        a = summary["grad_audit"]
        print(f"Gradient audit, manual vs jax.grad during training ({a['count']} checks): worst ratio "
              f"{a['max_violation']:.3g} (<= 1 agrees), max relative error {a['max_relative_error']:.3g}: "
              f"{'PASS' if a['passed'] else 'FAIL'}")
    sys.stdout.flush()


def _print_timings(summary: dict, workdir: pathlib.Path) -> None:
    """Where the run's time went, and where its outputs are."""
    timings = summary["timings"]
    if timings["steps_timed"]:
        pace = (f"{timings['seconds_per_step'] * 1e3:.1f} ms/step" if summary["config"]["batch_size"] == 0
                else f"{timings['seconds_per_epoch']:.3f} s/epoch")
        parts = len(summary.get("parts", ()))
        print(f"Trained {timings['steps_timed']} steps in {timings['train_s']:.2f} s ({pace}, "
              f"{timings['examples_per_s']:.0f} examples/s) after {timings['compile_s']:.2f} s of compilation "
              f"on {summary['environment']['cpu']}" + (f", in {parts} parts" if parts > 1 else ""))
    print(wall_time_line(timings))
    print(f"Outputs in {workdir}", flush=True)


def wall_time_line(timings: dict) -> str:
    """Where the run's wall time went, and its peak memory, in one line."""
    compile_s = (timings.get("compile_s") or 0) + (timings.get("eval_compile_s") or 0)
    train_s, eval_s, total_s = timings.get("train_s") or 0, timings.get("eval_s") or 0, timings.get("total_s") or 0
    data_s, gradcheck_s, plot_s = timings.get("data_s"), timings.get("gradcheck_s"), timings.get("plot_s")
    other = max(total_s - compile_s - train_s - eval_s - (data_s or 0) - (gradcheck_s or 0) - (plot_s or 0), 0.0)
    peak = timings.get("peak_rss_bytes")
    if data_s is None:  # a run recorded before these were timed (its total_s stopped before the plots)
        parts = f"other {other:.2f} s (data, gradient check at init, checkpoints)"
    elif plot_s is None:  # recorded before plots were timed (and before total_s included them)
        parts = (f"data {data_s:.2f} s, gradient check at init {gradcheck_s:.2f} s, other {other:.2f} s "
                 "(initialisation, checkpoints)")
    else:
        parts = (f"data {data_s:.2f} s, gradient check at init {gradcheck_s:.2f} s, plots {plot_s:.2f} s, "
                 f"other {other:.2f} s (initialisation, checkpoints)")
    return (f"Wall time {total_s:.2f} s: training {train_s:.2f} s, evaluation {eval_s:.2f} s, compilation "
            f"{compile_s:.2f} s, {parts}" + (f"; peak memory {peak / 2**30:.2f} GiB" if peak else ""))


# --- gradient check, evaluation and prediction ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trained:
    """One model of a training run, ready to apply: the run's config, data and plan; the model's
    params and model state (batch-norm statistics, or None), at the checkpoint of `step` (None:
    at its initialisation); `model` says which of the run's models it is."""

    config: Config
    dataset: data.Dataset
    plan: train.Plan
    params: list
    model_state: list | None
    step: int | list[int] | None  # a list: an ensemble's models at their own best-validation steps
    model: dict  # {"index", "of", "seed", "learning_rate"}


def restore_trained(workdir: pathlib.Path, config: Config | None = None):
    """(config, dataset, plan, state) from a training workdir's latest checkpoint (with
    --select=best_validation, its best-validation states): the state of every model (stacked on a
    leading axis of K when the run trained K > 1), on the run's mesh; `train.reported_model(state)`
    is what to apply. `config`: the run's (default: its config.json)."""
    config = config or read_workdir_config(workdir)
    dataset = load_dataset(config)
    plan = make_plan(config, dataset)
    return config, dataset, plan, _restore(workdir, plan)


def _restore(workdir: pathlib.Path, plan: train.Plan) -> train.TrainState:
    """The run's reported state: its latest checkpoint, or with --select=best_validation each
    model's best-validation state (`BEST_DIR`) once there is one."""
    if _latest_checkpoint(workdir) is None:
        raise ConfigError(f"{workdir} holds a training run with no checkpoint yet (it stopped before its first); "
                          "resume it with its training command first")
    best = plan.config.select == "best_validation" and _latest_checkpoint_in(workdir / BEST_DIR) is not None
    try:
        state, _ = checkpoint.restore(workdir / (BEST_DIR if best else CHECKPOINT_DIR), plan.init_state())
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    return state


def _one_model(plan: train.Plan, index: int | str, workdir) -> tuple[dict, callable]:
    """({"index", "of", "seed", "learning_rate"}, tree -> model `index`'s part of a state tree).
    index ENSEMBLE: ({"index": "ensemble", "of", "seeds", "learning_rates"}, every model's, stacked)."""
    lanes = plan.model_lanes()
    if index == ENSEMBLE:
        if not plan.vmapped:
            raise ConfigError(f"--model=ensemble needs a run of several models (--num_seeds), but {workdir} holds one")
        return ({"index": ENSEMBLE, "of": len(lanes), "seeds": [m["seed"] for m in lanes],
                 "learning_rates": [m["learning_rate"] for m in lanes]}, lambda tree: tree)
    if not 0 <= index < len(lanes):
        raise ConfigError(f"--model={index}, but the run in {workdir} holds {len(lanes)} model(s): "
                          f"pass an index in 0..{len(lanes) - 1}")
    about = {"index": index, "of": len(lanes), **lanes[index]}
    if not plan.vmapped:
        return about, lambda tree: tree
    pick = lambda tree: jax.tree.map(lambda x: x[index], tree)  # noqa: E731
    if plan.layout.mesh is None:
        return about, pick
    return about, compiling.jit(pick, platform=plan.layout.platform,
                                out_shardings=plan.layout.sharding(parallel.P()))  # on every device and process


def load_trained(workdir: pathlib.Path, config: Config | None = None, model_index: int | str = 0,
                 at_init: bool = False) -> Trained:
    """Model `model_index` of the training run in `workdir` (ENSEMBLE: all of them, stacked on a
    leading axis), from its latest checkpoint (or, with `at_init`, as the run initialised it). The
    one place that reads a trained model."""
    config = config or read_workdir_config(workdir)
    dataset = load_dataset(config)
    plan = make_plan(config, dataset)
    about, pick = _one_model(plan, model_index, workdir)
    state = plan.init_state(placed=False) if at_init else _restore(workdir, plan)
    steps = [] if at_init else [int(s) for s in parallel.host_value(pick(state.step)).reshape(-1)]
    # One step, or for an ensemble with --select=best_validation each model's own.
    step = None if at_init else steps[0] if len(set(steps)) == 1 else steps
    params, model_state = train.reported_model(state)  # the moving averages with --ema_decay
    return Trained(config, dataset, plan, pick(params), pick(model_state) if plan.spec.stateful else None, step,
                   about)


def _about_model(trained: Trained) -> str:
    m = trained.model
    best = " of its best validation accuracy (--select=best_validation)" if trained.config.select != "final" else ""
    at = ("its initialisation" if trained.step is None else f"the checkpoint at step {trained.step}{best}"
          if isinstance(trained.step, int) else f"the checkpoints at steps {', '.join(map(str, trained.step))}{best}")
    if m["index"] == ENSEMBLE:
        return f"the ensemble of its {m['of']} models (seeds {', '.join(map(str, m['seeds']))}), at {at}"
    which = (f"model {m['index']} of {m['of']} (seed {m['seed']}, learning rate {m['learning_rate']:g}; --model "
             "picks another)" if m["of"] > 1 else "its model")
    return f"{which}, at {at}"


def run_gradcheck(config: Config, workdir: pathlib.Path, model_index: int = 0) -> dict:
    """Manual vs jax.grad vs finite differences for the config's model at the initial params its
    training starts from, with a verdict; writes gradcheck.json in `workdir`."""
    with precision(config):
        dataset = load_dataset(config)
        plan = make_plan(config, dataset)
        about, pick = _one_model(plan, model_index, workdir)
        trained = Trained(config, dataset, plan, pick(plan.init_state(placed=False).params), None, None, about)
        return _gradcheck(trained, workdir, "at init")


def run_gradcheck_of_run(workdir: pathlib.Path, given: dict | None = None, model_index: int = 0,
                         at_init: bool = False) -> dict:
    """The gradient check of a training run's model (its config, at its latest checkpoint or its
    initialisation); writes gradcheck.json beside the run's files and touches none of them."""
    config = run_config(workdir, given)
    with precision(config):
        trained = load_trained(workdir, config, model_index, at_init)
        print(f"Checking the run in {workdir}: {_about_model(trained)}")
        return _gradcheck(trained, workdir, "at init" if at_init else f"at step {trained.step}")


def _gradcheck(trained: Trained, workdir: pathlib.Path, at: str) -> dict:
    config, plan = trained.config, trained.plan
    batch = gradient_batch(trained.dataset, plan.spec, plan.dtype, config.gradcheck_examples)
    key = jax.random.PRNGKey(config.seed + 2) if plan.spec.has_dropout else None
    reports = gradcheck.check(trained.params, batch, plan.spec, jax.random.PRNGKey(config.seed + 1),
                              config.gradcheck_coords, dropout_key=key)
    passed = gradcheck.verdict(reports)
    n = int(batch[1].shape[0])
    print(f"Gradient check {at} on {n} examples, {config.dtype_name}, {network_text(plan)}:")
    print(gradcheck.format_reports(reports))
    print(f"Verdict: {'PASS' if passed else 'FAIL'}")
    output = {"mode": "gradcheck", "config": config.to_dict(), "params": at, "model": trained.model,
              "passed": passed, "dtype": config.dtype_name, "examples": n,
              "leaves": [dict(dataclasses.asdict(r), passed=r.passed) for r in reports]}
    if parallel.is_primary():
        report.write_json(workdir / GRADCHECK_FILE, output)
    print(f"Wrote {workdir / GRADCHECK_FILE}")
    return output


def run_eval(workdir: pathlib.Path, given: dict | None = None, model_index: int | str = 0) -> dict:
    """Loss, accuracy and per-class accuracy on validation and test from the latest checkpoint.
    model_index ENSEMBLE: the ensemble's accuracy (mean of the models' output probabilities), its
    per-class accuracy and confusion matrix, beside the models' mean ± std."""
    config = run_config(workdir, given)
    with precision(config):
        trained = load_trained(workdir, config, model_index)
        dataset, plan = trained.dataset, trained.plan
        ensemble = trained.model["index"] == ENSEMBLE
        evaluator = train.Evaluator(plan.spec, plan.dtype, vmapped=ensemble, layout=plan.layout)
        found = evaluator.splits(trained.params, train.device_splits(dataset, plan.layout), ("validation", "test"),
                                 trained.model_state)
    print(f"Evaluating {_about_model(trained)}")
    summary = {"mode": "eval", "workdir": str(workdir), "step": trained.step, "model": trained.model}
    num_classes = plan.spec.num_classes
    print(f"{'split':<12} {'loss':>8} {'accuracy':>9}   per-class accuracy (0..{num_classes - 1})")
    for name in ("validation", "test"):
        if f"{name}_accuracy" not in found:
            print(f"{name:<12} none (the run holds out no {name} images)")
            continue
        labels = getattr(dataset, name).labels
        if ensemble:  # models that diverged are left out
            predictions = train.ensemble_predictions(found[f"{name}_probabilities"])
            if predictions is None:
                raise UsageError(f"every model of the run in {workdir} diverged: there is no ensemble to evaluate")
            accuracy = float(np.mean(predictions == labels))
        else:
            predictions, accuracy = found[f"{name}_predictions"], float(found[f"{name}_accuracy"])
        losses = np.atleast_1d(found[f"{name}_loss"])  # an ensemble's: the mean of its models' costs
        loss = float(np.mean(losses[np.isfinite(losses)])) if np.isfinite(losses).any() else math.nan
        cm = report.confusion_matrix(labels, predictions, num_classes)
        per_class = report.per_class_accuracy(cm)
        summary[name] = {"loss": loss, "accuracy": accuracy, "per_class_accuracy": per_class.tolist(),
                         "confusion_matrix": cm.tolist()}
        print(f"{name:<12} {loss:8.4f} {accuracy:9.4f}   " + " ".join(f"{a:.3f}" for a in per_class))
        if ensemble:
            models = train.summarise(found[f"{name}_accuracy"])
            summary[name]["models"] = models
            print(f"{'':<12} {'':>8} {'':>9}   the {trained.model['of']} models alone: {models['mean']:.4f} ± "
                  f"{models['std']:.4f} (min {models['min']:.4f}, max {models['max']:.4f})")
        if name == "test" and parallel.is_primary():
            report.plot_confusion_matrix(cm, workdir / EVAL_CONFUSION_FILE)
    if parallel.is_primary():
        report.write_json(workdir / EVAL_FILE, summary)
    print(f"Wrote {workdir / EVAL_FILE} and {workdir / EVAL_CONFUSION_FILE}")
    return summary


def run_predict(workdir: pathlib.Path, images_spec: str, save_preprocessed: bool, given: dict | None = None,
                model_index: int | str = 0) -> tuple[dict, int]:
    """Classifies the user's image files; returns (predictions, number of files that failed).
    With no readable image, nothing is written and it is a UsageError."""
    try:
        paths = predict.find_images(images_spec)
    except predict.ImageError as e:
        raise ConfigError(str(e)) from None
    config = run_config(workdir, given)
    images, good, errors = predict.preprocess_files(paths)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if not good:
        raise UsageError(f"none of the {len(paths)} image file(s) could be read; nothing written")
    with precision(config):
        trained = load_trained(workdir, config, model_index)
        plan = trained.plan
        if trained.dataset.image_shape != (predict.MNIST_SIZE, predict.MNIST_SIZE):
            raise ConfigError(f"predict makes 28x28 MNIST-style inputs, but the model in {workdir} takes "
                              f"{'x'.join(map(str, trained.dataset.image_shape))} images")
        def one_model(params, model_state, images_u8):  # sigmoid outputs normalised for display
            logits = model.predict_logits(params, model.inputs(images_u8, plan.spec, plan.dtype), plan.spec,
                                          model_state)
            return train.output_probabilities(logits, plan.spec)

        if trained.model["index"] == ENSEMBLE:  # the mean of the models' probabilities (diverged: NaN, left out)
            apply = compiling.jit(
                lambda p, s, u8: jnp.nanmean(jax.vmap(one_model, in_axes=(0, 0, None))(p, s, u8), axis=0))
        else:
            apply = compiling.jit(one_model)

        def probabilities(images_u8: np.ndarray) -> np.ndarray:
            return np.asarray(apply(trained.params, trained.model_state, jnp.asarray(images_u8)), np.float64)

        found = predict.classify(images, good, probabilities)
    print(f"Predicting with {_about_model(trained)}")
    print(predict.format_table(found))
    if save_preprocessed and parallel.is_primary():
        shutil.rmtree(workdir / PREPROCESSED_DIR, ignore_errors=True)  # no images of an earlier call beside these
        written = predict.save_preprocessed(images, good, workdir / PREPROCESSED_DIR)
        print(f"Wrote {len(written)} preprocessed 28x28 images to {workdir / PREPROCESSED_DIR}")
    output = {"mode": "predict", "workdir": str(workdir), "step": trained.step, "model": trained.model,
              "predictions": found, "errors": errors}
    if parallel.is_primary():
        report.write_json(workdir / PREDICTIONS_FILE, output)
    print(f"Wrote {workdir / PREDICTIONS_FILE}")
    return output, len(errors)


# --- benchmark and results ----------------------------------------------------------------------


def run_benchmark(config: Config, workdir: pathlib.Path) -> list[dict]:
    """Times the training step over the config's bench_* sweep; writes csv, json and png."""
    with precision(config):
        dataset = load_dataset(config)
        try:  # every network fits the data and the devices, before the workdir or any timing
            for plan in bench.plans(config, dataset):
                check_classes(plan.spec, plan.config, dataset)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        workdir.mkdir(parents=True, exist_ok=True)
        progress = Progress(bench.num_rows(config), 0, unit="row")

        def on_row(index: int, total: int, row: dict) -> None:
            progress.update(index, {"net": row["network"], "batch": row["batch_size"], "grad": row["grad"],
                                    "ex/s": float(row["examples_per_s"])})

        try:
            rows = bench.run(config, dataset, progress=on_row)
        except ValueError as e:
            raise UsageError(str(e)) from None
        finally:
            progress.close()
    paths = bench.write_outputs(rows, workdir, config)
    print(bench.format_table(rows))
    print(f"Wrote {', '.join(str(p) for p in paths.values())}")
    return rows


def train_one_at_a_time(config: Config, runs_dir: pathlib.Path) -> dict:
    """Trains config.num_seeds seeds one after another, each its own run in runs_dir/seed_<seed>
    (for conv nets faster than vmapping them: XLA's CPU convolutions batch models poorly), and
    combines their summaries into one of the K models: accuracy distributions, the ensemble of
    their final models (as a vmapped run's summary has it: from the output probabilities of each
    run's own final evaluation), the runs' summed times. A seed's run already in runs_dir (of this
    config: else a ConfigError) is resumed, or reported if it is finished."""
    summaries, probabilities = [], {}
    for i in range(config.num_seeds):
        one = dataclasses.replace(config, num_seeds=1, seed=config.seed + i)
        print(f"--- seed {one.seed} ({i + 1} of {config.num_seeds}) ---", flush=True)
        found = {}
        summaries.append(run_train(one, runs_dir / f"seed_{one.seed}", final_outputs=found))
        for key in ("validation_probabilities", "test_probabilities"):
            if key in found:
                probabilities.setdefault(key, []).append(np.asarray(found[key]))
    stacked = {k: np.stack(v) for k, v in probabilities.items()}
    keep = np.all(np.isfinite(stacked["test_probabilities"]), axis=(1, 2))  # diverged models are left out
    return combined_summary(summaries, ensemble_summary(stacked, load_dataset(config), keep))


def combined_summary(summaries: list[dict], ensemble: dict) -> dict:
    """The summary of K single-model runs as one run of K models (what results.add reads): final
    means, across_models distributions, the ensemble, and the runs' times summed (peak memory:
    the first run's; seconds_per_epoch and examples_per_s: one model's, the mean)."""
    first = summaries[0]
    across = {k: train.summarise([s["final"].get(k, math.nan) for s in summaries]) for k in first["final"]}
    times = [s["timings"] for s in summaries]
    summed = {k: sum(t.get(k) or 0 for t in times) for k in PART_TIMINGS}
    # Peak memory is the process's so far: only the first run's is that of a run on its own (the
    # later ones add what the earlier runs left in the process: datasets, compiled programs).
    timings = {**summed, "peak_rss_bytes": times[0].get("peak_rss_bytes"),
               **{k: float(np.mean([t[k] for t in times])) if all(t.get(k) for t in times) else None
                  for k in ("seconds_per_epoch", "seconds_per_step", "examples_per_s")},
               "train_s_per_model": [t["train_s"] for t in times]}
    combined = {"mode": "train", "config": first["config"], "environment": first["environment"],
                "epochs": first["epochs"], "steps": first["steps"], "num_models": len(summaries),
                "models_trained_at_once": 1, "final": {k: d["mean"] for k, d in across.items()},
                "across_models": across, "ensemble": ensemble, "timings": timings}
    if all("best_validation" in s for s in summaries):  # (--select=best_validation: each run's own)
        best = train.summarise([s["best_validation"]["test_accuracy"] for s in summaries])
        combined["best_validation"] = {"test_accuracy": best["mean"], "across_models": {"test_accuracy": best}}
    return combined


def run_results(entries: list[tuple[pathlib.Path, Config]], seeds: int, results_dir: pathlib.Path,
                runs_dir: pathlib.Path, readme: pathlib.Path | None = None, overrides: dict | None = None,
                one_at_a_time: bool = False, resume: bool = False) -> dict:
    """Trains every experiment over `seeds` seeds (vmapped, or with `one_at_a_time` one run per
    seed) and regenerates the results table in results_dir/results.{json,md}. Entries already in
    results.json for other experiments are kept. A result is a fresh run unless `resume`: then
    the runs in runs_dir are kept and resumed (or reported if finished), and each run checkpoints
    at every evaluation, so a run longer than a session survives its end.

    readme: given only when publishing (results_dir is the repository's docs/): then the README's
    table and each flagfile's "Result" header line are rewritten too. overrides: values the
    entries' configs were changed by (already applied), recorded with every entry so that a
    result is never mistaken for its flagfile's own; they never publish."""
    if readme is not None and overrides:
        raise ConfigError(f"{', '.join(f'{k}={config_lib.format_value(v)}' for k, v in overrides.items())} would "
                          "change the published results: pass another --results_dir")
    table = results.load(results_dir / "results.json")  # (what the README gets when no entry runs)
    for path, config in entries:
        name = path.stem
        config = dataclasses.replace(config, num_seeds=seeds, checkpoint_every=0)
        print(f"\n=== {name}: {seeds} seeds ===", flush=True)
        if resume:
            config = dataclasses.replace(config, checkpoint_every=make_plan(config, load_dataset(config)).eval_every)
        else:
            shutil.rmtree(runs_dir / name, ignore_errors=True)  # a fresh run, never a resume
        try:
            summary = (train_one_at_a_time(config, runs_dir / name) if one_at_a_time
                       else run_train(config, runs_dir / name))
        except Interrupted as e:  # (a training command's advice, completed for a results command)
            if resume:
                raise
            raise Interrupted(f"{e} with --results_resume (make results RESUME=1); without it a results command "
                              "starts afresh") from None
        except ConfigError as e:  # (a kept run of another config: its advice names --overwrite)
            if not resume:
                raise
            raise ConfigError(f"{e} (for --mode=results: drop --results_resume to start afresh, or remove "
                              f"{runs_dir / name})") from None
        # (read again: another results command may have added its rows while this one trained)
        table = results.add(results.load(results_dir / "results.json"), name, path, summary, overrides)
        results.write(table, results_dir)
        if readme is not None:
            results.update_flagfile(path, table["experiments"][name])
    if readme is not None and not results.update_readme(readme, table):
        logging.warning("%s has no results markers; its table was not updated", readme)
    print(f"Wrote {results_dir / 'results.md'} and {results_dir / 'results.json'}")
    return table
