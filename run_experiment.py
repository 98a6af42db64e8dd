"""Runs a digits experiment: flags -> a frozen Config -> the chosen mode.

    python run_experiment.py --flagfile=experiments/seed_784_10_10.cfg
    python run_experiment.py --flagfile=experiments/nielsen_784_30_10.cfg --epochs=5
    python run_experiment.py --help

This is the only place that defines flags. The flags of the Config are derived from its field
declarations in `digits/config.py` (name, type, default, help, bounds); the few defined here by
hand say what to do with a config (mode, workdir), not what it is.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging as python_logging
import os
import pathlib
import re
import sys

from absl import app, flags, logging

from digits import config as config_lib

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "train", config_lib.MODES, "What to run.")
flags.DEFINE_string("workdir", "", "Output directory (default: a fresh timestamped folder under runs/). "
                    "Re-running train with the same workdir resumes from its last checkpoint.")
flags.DEFINE_bool("overwrite", False, "Replace a run with a different config in --workdir.")
flags.DEFINE_bool("tensorboard", False, "Also write TensorBoard event files (tensorboardX) to <workdir>/tensorboard.")
flags.DEFINE_string("images", "", "For --mode=predict: image files and/or folders, comma-separated.")
flags.DEFINE_bool("save_preprocessed", False, "For --mode=predict: write the 28x28 inputs as PNG.")
flags.DEFINE_list("results_flagfiles", [], "For --mode=results: the experiment flagfiles to run "
                  "(default: every training flagfile in experiments/).")
flags.DEFINE_integer("results_seeds", 5, "For --mode=results: seeds per experiment (trained at once with vmap).",
                     lower_bound=1)
flags.DEFINE_string("results_dir", "docs", "For --mode=results: where results.md and results.json go.")
flags.DEFINE_integer("port", 8000, "For --mode=serve: the TCP port of the drawing page (0: any free port).",
                     lower_bound=0, upper_bound=65535)
flags.DEFINE_string("host", "127.0.0.1", "For --mode=serve: the address to listen on (another than 127.0.0.1 "
                    "lets other machines use the page).")
# Process setup: how this process joins the devices, not what it computes (so not in the Config).
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for a multi-process run (jax.distributed); "
                    "without it, SLURM / Open MPI / TPU-pod jobs are detected by JAX, anything else is one process.")
flags.DEFINE_integer("num_processes", 0, "Processes in the multi-process run (with --coordinator_address).", lower_bound=0)
flags.DEFINE_integer("process_id", -1, "This process's index in [0, --num_processes).", lower_bound=-1)
flags.DEFINE_integer("cpu_devices", 0, "Make the CPU platform expose this many devices (to try meshes on one "
                     "machine; 0: JAX's default, one).", lower_bound=0)


class FlagError(ValueError):
    """A bad flag value: one line on stderr, exit status 2."""


def define_config_flags(flag_values: flags.FlagValues) -> None:
    """One flag per Config field, typed from its declaration; tuples are comma-separated text."""
    for f in config_lib.fields():
        m, kind, help_text = f.metadata, config_lib.element_type(f), f.metadata["help"]
        if config_lib.is_tuple(f):
            flags.DEFINE_string(f.name, config_lib.format_value(f.default), help_text, flag_values=flag_values)
        elif kind is bool:
            flags.DEFINE_bool(f.name, f.default, help_text, flag_values=flag_values)
        elif m["choices"] is not None:
            flags.DEFINE_enum(f.name, f.default, m["choices"], help_text, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(f.name, f.default, help_text, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(f.name, f.default, help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(f.name, f.default, help_text, flag_values=flag_values)
    for old, new in config_lib.RENAMED.items():
        flags.DEFINE_alias(old, new, flag_values=flag_values)


define_config_flags(FLAGS)


def config_from(flag_values: flags.FlagValues) -> config_lib.Config:
    """Freezes parsed flags into a Config; its own validation turns bad values into FlagError."""
    values = {f.name: flag_values[f.name].value for f in config_lib.fields()}
    try:
        return config_lib.Config(**values)
    except ValueError as e:
        raise FlagError(as_flags(str(e))) from None


def as_flags(message: str) -> str:
    """A Config error in the command line's words: field names become --flags."""
    names = "|".join(sorted((f.name for f in config_lib.fields()), key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({names})(?=[=:]| must| needs|$)", r"--\1", message)


def config_from_flagfile(path: str) -> config_lib.Config:
    """The Config a flagfile describes, parsed by a fresh set of the same flags (for --mode=results)."""
    flag_values = flags.FlagValues()
    define_config_flags(flag_values)
    # Accepted (flagfiles name their mode, a benchmark flagfile its devices) and ignored.
    for name in ("mode", "workdir", "cpu_devices", "coordinator_address", "num_processes", "process_id"):
        flags.DEFINE_string(name, "", "", flag_values=flag_values)
    try:
        flag_values(["results", f"--flagfile={path}"])
    except flags.Error as e:
        raise FlagError(f"{path}: {e}") from None
    return config_from(flag_values)


def workdir_from_flags(mode: str) -> pathlib.Path:
    if FLAGS.workdir:
        return pathlib.Path(FLAGS.workdir)
    if mode in ("eval", "predict", "serve"):
        raise FlagError(f"--mode={mode} needs --workdir pointing at a training run")
    return pathlib.Path("runs") / f"{mode}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def results_flagfiles() -> list[pathlib.Path]:
    if FLAGS.results_flagfiles:
        return [pathlib.Path(p) for p in FLAGS.results_flagfiles]
    root = pathlib.Path(__file__).resolve().parent / "experiments"
    return sorted(p for p in root.glob("*.cfg") if "--mode=train" in p.read_text())


def run(mode: str) -> int:
    from digits import experiment

    if mode == "results":
        entries = [(p, config_from_flagfile(str(p))) for p in results_flagfiles()]
        overrides = {name: FLAGS[name].value for name in ("cache_dir", "data_source", "tfds_data_dir", "idx_dir")
                     if FLAGS[name].present}
        entries = [(p, dataclasses.replace(c, **overrides)) for p, c in entries]
        results_dir = pathlib.Path(FLAGS.results_dir)
        root = pathlib.Path(__file__).resolve().parent
        readme = root / "README.md" if results_dir.resolve() == root / "docs" else None  # the published table
        experiment.run_results(entries, FLAGS.results_seeds, results_dir, pathlib.Path(FLAGS.workdir or "runs/results"),
                               readme)
        return 0
    workdir = workdir_from_flags(mode)
    if mode == "eval":
        experiment.run_eval(workdir)
        return 0
    if mode == "serve":
        from digits import serve

        serve.run(workdir, FLAGS.host, FLAGS.port)
        return 0
    if mode == "predict":
        if not FLAGS.images:
            raise FlagError("--mode=predict needs --images=a.png,b.jpg or a folder")
        _, failures = experiment.run_predict(workdir, FLAGS.images, FLAGS.save_preprocessed)
        return 1 if failures else 0
    config = config_from(FLAGS)
    if mode == "train":
        experiment.run_train(config, workdir, overwrite=FLAGS.overwrite, tensorboard=FLAGS.tensorboard)
    elif mode == "gradcheck":
        return 0 if experiment.run_gradcheck(config, workdir)["passed"] else 1
    else:
        experiment.run_benchmark(config, workdir)
    return 0


def check_processes() -> None:
    """The process flags agree with each other (before any of them is acted on)."""
    if FLAGS.coordinator_address:
        if FLAGS.num_processes < 1 or not 0 <= FLAGS.process_id < FLAGS.num_processes:
            raise FlagError(f"--coordinator_address needs --num_processes >= 1 and --process_id in [0, num_processes), "
                            f"got --num_processes={FLAGS.num_processes} --process_id={FLAGS.process_id}")
    elif FLAGS.num_processes or FLAGS.process_id >= 0:
        raise FlagError("--num_processes and --process_id need --coordinator_address=host:port")


def start_processes() -> None:
    """Joins the devices (and, for a multi-process run, the other processes); then only process 0
    talks to the terminal."""
    from digits import parallel

    check_processes()
    try:
        parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.cpu_devices)
    except (RuntimeError, ValueError) as e:
        raise FlagError(f"cannot start JAX's distributed runtime: {' '.join(str(e).split())}") from None
    if not parallel.is_primary():
        sys.stdout = open(os.devnull, "w")  # errors still reach stderr
        logging.set_verbosity(logging.WARNING)


def main(argv) -> int:
    python_logging.getLogger("jax._src.xla_bridge").setLevel(python_logging.WARNING)  # no libtpu noise
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from digits import experiment

    try:
        start_processes()
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


def console_main():
    """The `digits` console script (setup.cfg): the same flags as `python run_experiment.py`."""
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console_main()
