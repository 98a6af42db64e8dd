"""The application layer: runs one mode of `run_experiment.py` from a frozen Config.

Unlike the rest of the library this module talks to a person (printed lines, a progress bar,
tables) and owns the work directory: config.json, metrics, checkpoints, plots and summaries.
The training loop itself is `train.fit`; this module plugs its hooks in. It never reads flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from digits import bench, checkpoint, data, files, gradcheck, model, parallel, predict, report, results, train
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


def precision(config: Config):
    """float64 for the duration of a mode when the config asks for it (no global side effect)."""
    return jax.enable_x64(True) if config.x64 else contextlib.nullcontext()


# --- the work directory ---------------------------------------------------------------------------


def read_workdir_config(workdir: pathlib.Path) -> Config:
    path = workdir / CONFIG_FILE
    try:
        return Config.from_dict(json.loads(path.read_text())["config"])
    except FileNotFoundError:
        raise UsageError(f"{workdir} holds no training run ({CONFIG_FILE} missing); train there first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is unreadable ({' '.join(str(e).split())}); pass another --workdir") from None


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
            if parallel.is_primary():
                for name in OUTPUT_FILES + (CHECKPOINT_DIR,):
                    path = workdir / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if parallel.is_primary():  # in a multi-process run, process 0 writes; every process checks
        workdir.mkdir(parents=True, exist_ok=True)
        report.write_json(config_path, {"config": config.to_dict(), **report.environment(), **extra})
    if jax.process_count() > 1:  # nobody looks for checkpoints while process 0 may be deleting them
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("workdir prepared")


# --- data ---------------------------------------------------------------------------------------


def load_dataset(config: Config) -> data.Dataset:
    """The dataset the config names, with its validation split, as uint8 arrays."""
    try:
        dataset = data.load(
            config.data_source, config.dataset, cache_dir=config.cache_dir or None, idx_dir=config.idx_dir or None,
            tfds_data_dir=config.tfds_data_dir or None, tfds_download=config.tfds_download,
        )
        dataset = data.split_validation(dataset, config.validation_size)
    except data.DataError as e:
        raise UsageError(str(e)) from None
    if config.train_examples:
        if config.train_examples > len(dataset.train):
            raise UsageError(f"train_examples={config.train_examples} exceeds the {len(dataset.train)} training images")
        n = config.train_examples
        dataset = dataclasses.replace(dataset, train=data.Split(dataset.train.images[:n], dataset.train.labels[:n]))
    return dataset


def make_plan(config: Config, dataset: data.Dataset) -> train.Plan:
    """train.Plan.create, with a config that does not fit the data or the devices as a one-line
    UsageError."""
    try:
        return train.Plan.create(config, dataset)
    except ValueError as e:
        raise UsageError(str(e)) from None


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
    return model.inputs(jnp.asarray(dataset.train.images[:n]), spec, dtype), jnp.asarray(dataset.train.labels[:n])


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


class _WorkdirHooks(train.Hooks):
    """What a command-line run does between chunks: checkpoints, Ctrl-C, metrics, progress."""

    def __init__(self, plan: train.Plan, workdir: pathlib.Path, step: int, last_checkpoint, stop: dict,
                 metrics: report.MetricsWriter, tensorboard: bool):
        self.plan, self.ckpt_dir, self.stop = plan, workdir / CHECKPOINT_DIR, stop
        self.last_checkpoint, self.metrics = last_checkpoint, metrics
        self.progress = Progress(plan.total_steps, step)
        self.tb = report.TensorBoardWriter(workdir / "tensorboard") if tensorboard and metrics else None
        self.fingerprint = {"fingerprint": plan.config.training_fingerprint()}

    def save(self, step: int, state) -> None:
        checkpoint.save(self.ckpt_dir, step, state, self.fingerprint, self.plan.config.keep_checkpoints)
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
        if self.metrics:
            self.metrics.write(record)
        if self.tb:
            self.tb.scalars(step, record)
        self.progress.update(step, {"loss": record["loss"], "val_acc": record["validation_accuracy"]})

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


def describe(plan: train.Plan, dataset: data.Dataset) -> str:
    c = plan.config
    net = c.layers or "-".join(map(str, c.layer_sizes))
    return (f"{dataset.name} ({dataset.source}): {len(dataset.train)} train, {len(dataset.validation)} validation, "
            f"{len(dataset.test)} test; {net} {c.activation}/{c.output}/{c.cost}; {c.optimizer} lr "
            f"{','.join(map(str, c.learning_rates))}; grad={c.grad}; {c.num_models} model(s); {plan.total_steps} steps "
            f"on {jax.devices()[0].device_kind}, {plan.layout.describe()}"
            + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""))


def run_train(config: Config, workdir: pathlib.Path, *, overwrite: bool = False, tensorboard: bool = False) -> dict:
    """Trains (or resumes) a run in `workdir` and writes metrics, checkpoints, plots and summary."""
    with precision(config):
        return _train(config, workdir, overwrite, tensorboard)


def _train(config: Config, workdir: pathlib.Path, overwrite: bool, tensorboard: bool) -> dict:
    started = time.perf_counter()
    dataset = load_dataset(config)
    plan = make_plan(config, dataset)
    prepare_workdir(workdir, config, overwrite, {"train_size": len(dataset.train), "data_source": dataset.source,
                                                 "mesh": plan.layout.to_dict()})
    ckpt_dir = workdir / CHECKPOINT_DIR
    print(describe(plan, dataset), flush=True)

    host_state = plan.init_state(placed=False)
    first_params = jax.tree.map(lambda x: x[0], host_state.params) if plan.vmapped else host_state.params
    gradient_check = initial_gradient_check(first_params, dataset, plan.spec, plan.dtype)
    state = plan.place(host_state)
    try:
        restored = checkpoint.latest_step(ckpt_dir)
        if restored is not None:
            state, _ = checkpoint.restore(ckpt_dir, state)  # onto this run's mesh, whatever the saving run's
            print(f"Resuming from the checkpoint at step {restored} in {ckpt_dir}", flush=True)
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    step = train.host_step(state)
    _truncate_metrics(workdir / METRICS_FILE, step)

    device = train.device_splits(dataset, plan.layout)
    metrics_file = report.MetricsWriter(workdir / METRICS_FILE) if parallel.is_primary() else contextlib.nullcontext()
    with metrics_file as metrics, stop_requests() as stop:
        hooks = _WorkdirHooks(plan, workdir, step, restored, stop, metrics, tensorboard)
        try:
            result = train.fit(plan, state, device, [hooks])
        except train.Diverged as e:
            raise hooks.diverged(e) from None
        finally:
            hooks.close()
        if hooks.last_checkpoint != plan.total_steps:
            hooks.save(plan.total_steps, result.state)

    final = result.evaluator.splits(result.state.params, device, ("train_subset", "validation", "test"))
    summary = _final_summary(plan, dataset, workdir, result, final, gradient_check)
    summary["timings"] = {**result.timings(plan), "total_s": time.perf_counter() - started}
    if parallel.is_primary():
        report.write_json(workdir / SUMMARY_FILE, summary)
    _print_final(summary, workdir)
    return summary


def _final_summary(plan: train.Plan, dataset: data.Dataset, workdir, result: train.FitResult, final: dict,
                   gradient_check: dict) -> dict:
    first = final["test_predictions"][0] if plan.vmapped else final["test_predictions"]
    cm = report.confusion_matrix(dataset.test.labels, first, plan.spec.num_classes)
    if parallel.is_primary():
        report.plot_confusion_matrix(cm, workdir / "confusion_matrix.png")
        report.plot_misclassified(dataset.test.images, dataset.test.labels, first, workdir / "misclassified.png")
        report.plot_learning_curves(report.read_metrics(workdir / METRICS_FILE), workdir / "learning_curves.png")
    metrics = {k: v for k, v in final.items() if not k.endswith("_predictions")}
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
    }
    if plan.config.grad == "both" and plan.config.audit_every:
        summary["grad_audit"] = result.audit
    if plan.vmapped:
        summary["models"] = [dict(lane, diverged=bool(result.diverged[i])) for i, lane in enumerate(plan.model_lanes())]
        summary["across_models"] = {k: train.summarise(v) for k, v in metrics.items()}
    return summary


def _print_final(summary: dict, workdir: pathlib.Path) -> None:
    final, timings = summary["final"], summary["timings"]
    spread = ""
    if "across_models" in summary:
        test = summary["across_models"]["test_accuracy"]
        spread = f" (over {summary['num_models']} models: mean {test['mean']:.4f} ± {test['std']:.4f}, min {test['min']:.4f}, max {test['max']:.4f})"
    print(f"\nValidation accuracy: {final.get('validation_accuracy', float('nan')):.4f}")
    print(f"Test accuracy:       {final['test_accuracy']:.4f}{spread}")
    if timings["steps_timed"]:
        pace = (f"{timings['seconds_per_step'] * 1e3:.1f} ms/step" if summary["config"]["batch_size"] == 0
                else f"{timings['seconds_per_epoch']:.3f} s/epoch")
        print(f"Trained {timings['steps_timed']} steps in {timings['train_s']:.2f} s ({pace}, "
              f"{timings['examples_per_s']:.0f} examples/s) after {timings['compile_s']:.2f} s of compilation "
              f"on {summary['environment']['cpu']}")
    print(f"Outputs in {workdir}", flush=True)


# --- gradient check, evaluation and prediction ----------------------------------------------------


def run_gradcheck(config: Config, workdir: pathlib.Path) -> dict:
    """Manual vs jax.grad vs finite differences at the initial params, with a verdict."""
    with precision(config):
        dataset = load_dataset(config)
        plan = make_plan(config, dataset)
        params = model.init(jax.random.PRNGKey(config.seed), plan.spec, plan.dtype)
        batch = gradient_batch(dataset, plan.spec, plan.dtype, config.gradcheck_examples)
        key = jax.random.PRNGKey(config.seed + 2) if plan.spec.has_dropout else None
        reports = gradcheck.check(params, batch, plan.spec, jax.random.PRNGKey(config.seed + 1),
                                  config.gradcheck_coords, dropout_key=key)
    passed = gradcheck.verdict(reports)
    n = int(batch[1].shape[0])
    print(f"Gradient check on {n} examples, {config.dtype_name}, {config.layers or '-'.join(map(str, config.layer_sizes))} "
          f"{config.activation}/{config.output}/{config.cost}:")
    print(gradcheck.format_reports(reports))
    print(f"Verdict: {'PASS' if passed else 'FAIL'}")
    workdir.mkdir(parents=True, exist_ok=True)
    summary = {"mode": "gradcheck", "config": config.to_dict(), "passed": passed, "dtype": config.dtype_name,
               "examples": n, "leaves": [dict(dataclasses.asdict(r), passed=r.passed) for r in reports]}
    report.write_json(workdir / SUMMARY_FILE, summary)
    return summary


def restore_trained(workdir: pathlib.Path):
    """(config, dataset, plan, state) from a training workdir's latest checkpoint: the state of
    every model (stacked on a leading axis of K when the run trained K > 1), on the run's mesh."""
    config = read_workdir_config(workdir)
    dataset = load_dataset(config)
    plan = make_plan(config, dataset)
    try:
        state, _ = checkpoint.restore(workdir / CHECKPOINT_DIR, plan.init_state())
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    return config, dataset, plan, state


def load_trained(workdir: pathlib.Path):
    """(config, dataset, plan, params of model 0) from a training workdir's latest checkpoint."""
    config, dataset, plan, state = restore_trained(workdir)
    params = state.params
    if plan.vmapped:  # model 0, on every device (and process) of a mesh
        first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
        on_mesh = plan.layout.mesh is not None
        params = jax.jit(first, out_shardings=plan.layout.sharding(parallel.P()))(params) if on_mesh else first(params)
    if plan.vmapped:
        logging.info("%s holds %d models; using model 0 (seed %d)", workdir, config.num_models, config.seed)
    return config, dataset, plan, params


def run_eval(workdir: pathlib.Path) -> dict:
    """Loss, accuracy and per-class accuracy on validation and test from the latest checkpoint."""
    with precision(read_workdir_config(workdir)):
        config, dataset, plan, params = load_trained(workdir)
        evaluator = train.Evaluator(plan.spec, plan.dtype, vmapped=False, layout=plan.layout)
        found = evaluator.splits(params, train.device_splits(dataset, plan.layout), ("validation", "test"))
    summary = {"mode": "eval", "workdir": str(workdir)}
    num_classes = plan.spec.num_classes
    print(f"{'split':<12} {'loss':>8} {'accuracy':>9}   per-class accuracy (0..{num_classes - 1})")
    for name in ("validation", "test"):
        if f"{name}_accuracy" not in found:
            continue
        labels = getattr(dataset, name).labels
        cm = report.confusion_matrix(labels, found[f"{name}_predictions"], num_classes)
        per_class = report.per_class_accuracy(cm)
        summary[name] = {"loss": float(found[f"{name}_loss"]), "accuracy": float(found[f"{name}_accuracy"]),
                         "per_class_accuracy": per_class.tolist(), "confusion_matrix": cm.tolist()}
        print(f"{name:<12} {float(found[f'{name}_loss']):8.4f} {float(found[f'{name}_accuracy']):9.4f}   "
              + " ".join(f"{a:.3f}" for a in per_class))
        if name == "test" and parallel.is_primary():
            report.plot_confusion_matrix(cm, workdir / "confusion_matrix.png")
    if parallel.is_primary():
        report.write_json(workdir / "eval.json", summary)
    print(f"Wrote {workdir / 'eval.json'} and {workdir / 'confusion_matrix.png'}")
    return summary


def run_predict(workdir: pathlib.Path, images_spec: str, save_preprocessed: bool) -> tuple[dict, int]:
    """Classifies the user's image files; returns (predictions, number of files that failed)."""
    try:
        paths = predict.find_images(images_spec)
    except predict.ImageError as e:
        raise UsageError(str(e)) from None
    with precision(read_workdir_config(workdir)):
        config, dataset, plan, params = load_trained(workdir)
        if dataset.image_shape != (predict.MNIST_SIZE, predict.MNIST_SIZE):
            raise UsageError(f"predict makes 28x28 MNIST-style inputs, but the model in {workdir} takes "
                             f"{'x'.join(map(str, dataset.image_shape))} images")
        apply = jax.jit(lambda p, u8: model.apply(p, model.inputs(u8, plan.spec, plan.dtype), plan.spec))

        def probabilities(images_u8: np.ndarray) -> np.ndarray:
            outputs = np.asarray(apply(params, jnp.asarray(images_u8)), np.float64)
            return outputs / outputs.sum(axis=1, keepdims=True)  # sigmoid outputs normalised for display

        images, good, errors = predict.preprocess_files(paths)
        found = predict.classify(images, good, probabilities)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if found:
        print(predict.format_table(found))
    if save_preprocessed and found:
        written = predict.save_preprocessed(images, good, workdir / "preprocessed")
        print(f"Wrote {len(written)} preprocessed 28x28 images to {workdir / 'preprocessed'}")
    output = {"mode": "predict", "workdir": str(workdir), "predictions": found, "errors": errors}
    report.write_json(workdir / "predictions.json", output)
    print(f"Wrote {workdir / 'predictions.json'}")
    return output, len(errors)


# --- benchmark and results ----------------------------------------------------------------------


def run_benchmark(config: Config, workdir: pathlib.Path) -> list[dict]:
    """Times the training step over the config's bench_* sweep; writes csv, json and png."""
    with precision(config):
        dataset = load_dataset(config)
        try:
            bench.plans(config, dataset)  # every network fits the data, before the workdir or any timing
        except ValueError as e:
            raise UsageError(str(e)) from None
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


def run_results(entries: list[tuple[pathlib.Path, Config]], seeds: int, results_dir: pathlib.Path,
                runs_dir: pathlib.Path, readme: pathlib.Path | None = None) -> dict:
    """Trains every experiment over `seeds` seeds (vmapped) and regenerates the results table:
    results_dir/results.{json,md}, each flagfile's "Result" header line and, when given, the
    README's table. Entries already in results.json for other experiments are kept."""
    table = results.load(results_dir / "results.json")
    for path, config in entries:
        name = path.stem
        config = dataclasses.replace(config, num_seeds=seeds, checkpoint_every=0)
        print(f"\n=== {name}: {seeds} seeds ===", flush=True)
        shutil.rmtree(runs_dir / name, ignore_errors=True)  # a result is always a fresh run, never a resume
        summary = run_train(config, runs_dir / name)
        table = results.add(table, name, path, summary)
        results.write(table, results_dir)
        results.update_flagfile(path, table["experiments"][name])
    if readme is not None and not results.update_readme(readme, table):
        logging.warning("%s has no results markers; its table was not updated", readme)
    print(f"Wrote {results_dir / 'results.md'} and {results_dir / 'results.json'}")
    return table
