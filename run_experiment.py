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
flags.DEFINE_bool("overwrite", False, "Start afresh in --workdir: first remove every digits output there (the "
                  "old run's files, its checkpoints and what other modes wrote; other files stay).")
flags.DEFINE_bool("tensorboard", False, "Also write TensorBoard event files (tensorboardX) to <workdir>/tensorboard.")
flags.DEFINE_string("images", "", "For --mode=predict: image files and/or folders, comma-separated.")
flags.DEFINE_bool("save_preprocessed", False, "For --mode=predict: write the 28x28 inputs as PNG.")
flags.DEFINE_list("results_flagfiles", [], "For --mode=results: the experiment flagfiles to run "
                  "(default: every training flagfile in experiments/).")
flags.DEFINE_integer("results_seeds", 5, "For --mode=results: seeds per experiment (trained at once with vmap, "
                     "or one at a time with --results_one_at_a_time).",
                     lower_bound=1)
flags.DEFINE_bool("results_one_at_a_time", False, "For --mode=results: train the seeds one after another, each "
                  "its own run, instead of vmapped together (faster for conv nets on CPU); the ensemble is the same.")
flags.DEFINE_bool("results_resume", False, "For --mode=results: keep the runs already in --workdir (default "
                  "runs/results) and resume them, or report them if finished, instead of training afresh; every run "
                  "checkpoints at each evaluation, so a result longer than one session survives its end.")
flags.DEFINE_string("results_dir", "docs", "For --mode=results: where results.md and results.json go. Only docs "
                    "(the repository's) also rewrites the README table and the flagfiles' Result lines.")
flags.DEFINE_string("model", "0", "For --mode=eval, predict and gradcheck of a run of several models (--num_seeds, "
                    "--sweep_learning_rates): the index of the model to use, in the order of summary.json's models; "
                    "for eval and predict also 'ensemble': every model, their output probabilities averaged.")
flags.DEFINE_enum("gradcheck_at", "latest", ["latest", "init"], "For --mode=gradcheck with the --workdir of a "
                  "training run: check its model at its latest checkpoint or as it was initialised.")
flags.DEFINE_integer("port", 8000, "For --mode=serve: the TCP port of the drawing page (0: any free port).",
                     lower_bound=0, upper_bound=65535)
flags.DEFINE_string("host", "127.0.0.1", "For --mode=serve: the address to listen on (another than 127.0.0.1 "
                    "lets other machines use the page).")
# Process setup: how this process joins the devices, not what it computes (so not in the Config).
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for a multi-process run (jax.distributed); "
                    "without it, SLURM / Open MPI / TPU-pod jobs are detected by JAX, anything else is one process.")
flags.DEFINE_integer("num_processes", 0, "Processes in the multi-process run (with --coordinator_address).",
                     lower_bound=0)
flags.DEFINE_integer("process_id", -1, "This process's index in [0, --num_processes).", lower_bound=-1)
flags.DEFINE_string("compilation_cache_dir", None, "JAX's persistent compilation cache: compiled programs "
                    "(train step, evaluation, init, gradient check) kept on disk, so that running a flagfile again "
                    "skips most compilation. Default $XDG_CACHE_HOME/digits/jax (or $JAX_COMPILATION_CACHE_DIR "
                    "when set); '' turns it off.")
flags.DEFINE_integer("cpu_devices", 0, "Make the CPU platform expose this many devices (to try meshes on one "
                     "machine; 0: JAX's default, one).", lower_bound=0)


class FlagError(ValueError):
    """A bad flag value: one line on stderr, exit status 2."""


# Flags that only some modes read: given to another mode they are refused, never ignored.
MODE_FLAGS = {"overwrite": ("train",), "tensorboard": ("train",), "images": ("predict",),
              "save_preprocessed": ("predict",), "model": ("eval", "predict", "gradcheck"),
              "gradcheck_at": ("gradcheck",), "results_flagfiles": ("results",), "results_seeds": ("results",),
              "results_one_at_a_time": ("results",), "results_resume": ("results",),
              "results_dir": ("results",), "port": ("serve",),
              "host": ("serve",)}
MODE_FLAG_PREFIXES = {"bench_": ("benchmark",), "gradcheck_": ("gradcheck",)}  # Config fields of one mode


def expand(path: str) -> str:
    """A path as a shell user means it: `~` and `$VARS` expanded."""
    return os.path.expandvars(os.path.expanduser(path)) if path else path


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
    values = {f.name: expand(flag_values[f.name].value) if f.metadata["path"] else flag_values[f.name].value
              for f in config_lib.fields()}
    try:
        return config_lib.Config(**values)
    except ValueError as e:
        raise FlagError(as_flags(str(e))) from None


def as_flags(message: str) -> str:
    """A Config error in the command line's words: field names become --flags."""
    names = "|".join(sorted((f.name for f in config_lib.fields()), key=len, reverse=True))
    return re.sub(rf"(?<![\w/.-])({names})(?=[=:]| must| needs|$)", r"--\1", message)


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


def given_values(flag_values: flags.FlagValues = FLAGS) -> dict:
    """The Config values the command line (or its flagfiles) gave, each parsed on its own: to apply
    to another config (a run's, a flagfile's), which then validates the combination."""
    values = {}
    for f in config_lib.fields():
        if flag_values[f.name].present:
            value = flag_values[f.name].value
            try:
                value = f.metadata["parse"](value) if config_lib.is_tuple(f) else value
            except ValueError as e:
                raise FlagError(f"--{f.name}: {e}") from None
            values[f.name] = expand(value) if f.metadata["path"] else value
    return values


def check_mode_flags(mode: str) -> None:
    """Flags of other modes are refused, never ignored."""
    for name in [*MODE_FLAGS, *(f.name for f in config_lib.fields())]:
        modes = MODE_FLAGS.get(name) or next((m for p, m in MODE_FLAG_PREFIXES.items() if name.startswith(p)), None)
        if modes and mode not in modes and name in FLAGS and FLAGS[name].present:
            raise FlagError(f"--{name} is for --mode={' or '.join(modes)}, not --mode={mode}")


def model_index(mode: str) -> int | str:
    text = FLAGS.model.strip()
    if text == "ensemble" and mode in ("eval", "predict"):  # experiment.ENSEMBLE (imported later)
        return text
    if not text.isdigit():
        also = " or ensemble (all of them, their probabilities averaged)" if mode in ("eval", "predict") else ""
        raise FlagError(f"--model must be the index of one of the run's models (0, 1, ...){also}, got {FLAGS.model!r}")
    return int(text)


def workdir_from_flags(mode: str) -> pathlib.Path:
    if FLAGS.workdir:
        return pathlib.Path(expand(FLAGS.workdir))
    if mode in ("eval", "predict", "serve"):
        raise FlagError(f"--mode={mode} needs --workdir pointing at a training run")
    return pathlib.Path("runs") / f"{mode}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def results_flagfiles() -> list[pathlib.Path]:
    if FLAGS.results_flagfiles:
        return [pathlib.Path(expand(p)) for p in FLAGS.results_flagfiles]
    root = pathlib.Path(__file__).resolve().parent / "experiments"
    return sorted(p for p in root.glob("*.cfg") if "--mode=train" in p.read_text())


def run(mode: str) -> int:
    from digits import experiment

    check_mode_flags(mode)
    if mode == "results":
        # Every flag given applies to every flagfile; those that change what is trained mark the
        # results as not the flagfiles' own (and keep them out of the published docs/).
        overrides = given_values()
        if "num_seeds" in overrides:
            raise FlagError("--num_seeds: --mode=results trains --results_seeds seeds of every experiment")
        entries = []
        for path in results_flagfiles():
            try:
                entries.append((path, dataclasses.replace(config_from_flagfile(str(path)), **overrides)))
            except ValueError as e:
                raise FlagError(f"{path} with the flags given: {as_flags(str(e))}") from None
        fingerprinted = {f.name for f in config_lib.fields() if f.metadata["fingerprint"]}
        results_dir = pathlib.Path(expand(FLAGS.results_dir))
        root = pathlib.Path(__file__).resolve().parent
        readme = root / "README.md" if results_dir.resolve() == root / "docs" else None  # the published table
        experiment.run_results(entries, FLAGS.results_seeds, results_dir,
                               pathlib.Path(expand(FLAGS.workdir) or "runs/results"), readme,
                               {k: v for k, v in overrides.items() if k in fingerprinted}, FLAGS.results_one_at_a_time,
                               FLAGS.results_resume)
        return 0
    workdir = workdir_from_flags(mode)
    if mode == "eval":
        experiment.run_eval(workdir, given_values(), model_index(mode))
        return 0
    if mode == "serve":
        from digits import serve

        serve.run(workdir, FLAGS.host, FLAGS.port, given_values())
        return 0
    if mode == "predict":
        if not FLAGS.images:
            raise FlagError("--mode=predict needs --images=a.png,b.jpg or a folder")
        images = ",".join(expand(item.strip()) for item in FLAGS.images.split(","))
        _, failures = experiment.run_predict(workdir, images, FLAGS.save_preprocessed, given_values(),
                                             model_index(mode))
        return 1 if failures else 0
    if mode == "gradcheck" and experiment.is_training_run(workdir):  # that run's model, not the flags' one
        checked = experiment.run_gradcheck_of_run(workdir, given_values(), model_index(mode),
                                                  FLAGS.gradcheck_at == "init")
        return 0 if checked["passed"] else 1
    config = config_from(FLAGS)
    if mode == "train":
        experiment.run_train(config, workdir, overwrite=FLAGS.overwrite, tensorboard=FLAGS.tensorboard)
    elif mode == "gradcheck":
        return 0 if experiment.run_gradcheck(config, workdir, model_index(mode))["passed"] else 1
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


def use_compilation_cache(directory: str | None) -> None:
    """Turns on JAX's persistent compilation cache in `directory` (None: the default; '': off).
    Programs that compile in under 0.2 s are not worth a file."""
    import jax

    from digits import data

    if directory is None:
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(data.default_cache_dir() / "jax")
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_compilation_cache_dir", expand(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def start_processes() -> None:
    """Joins the devices (and, for a multi-process run, the other processes); then only process 0
    talks to the terminal."""
    from digits import parallel

    check_processes()
    use_compilation_cache(FLAGS.compilation_cache_dir)
    try:
        parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.cpu_devices)
    except (RuntimeError, ValueError) as e:
        raise FlagError(f"cannot start JAX's distributed runtime: {' '.join(str(e).split())}") from None
    if not parallel.is_primary():
        sys.stdout = open(os.devnull, "w")  # errors still reach stderr
        logging.set_verbosity(logging.WARNING)


def main(argv) -> int:
    python_logging.getLogger("jax._src.xla_bridge").setLevel(python_logging.WARNING)  # no libtpu noise
    from digits import experiment

    try:
        start_processes()
        return run(FLAGS.mode)
    except (FlagError, experiment.ConfigError) as e:  # a flag, or a flag that does not fit the data/devices/workdir
        print(f"error: {as_flags(str(e))}", file=sys.stderr)
        return 2
    except experiment.UsageError as e:  # it failed: divergence, a corrupt file, no readable image
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # unwritable workdir, full disk, ...: say which file, no traceback
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except experiment.Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _flag_in(args: list[str], i: int) -> tuple[str | None, str | None, int]:
    """(name, value text, args used) of the flag at args[i]; (None, None, 1) for anything else.
    Booleans read --x / --nox as "true" / "false"."""
    arg = args[i]
    if not arg.startswith("-") or arg in ("-", "--"):
        return None, None, 1
    name, eq, text = arg.lstrip("-").partition("=")
    if name == "flagfile":  # not a flag absl lists
        return (name, text, 1) if eq else ((name, args[i + 1], 2) if i + 1 < len(args) else (None, None, 1))
    if name not in FLAGS and name.startswith("no") and name[2:] in FLAGS and FLAGS[name[2:]].boolean and not eq:
        return name[2:], "false", 1
    if name not in FLAGS:
        return None, None, 1
    if not eq:
        if FLAGS[name].boolean:
            return name, "true", 1
        return (name, args[i + 1], 2) if i + 1 < len(args) else (None, None, 1)
    return name, text, 1


def _same_value(name: str, a: str, b: str) -> bool:
    try:
        return FLAGS[name].parser.parse(a) == FLAGS[name].parser.parse(b)
    except (ValueError, TypeError):
        return a == b


def check_flagfile_order(args: list[str]) -> None:
    """A flag given before a --flagfile that sets it again would lose to the flagfile's value:
    refused (put it after the flagfile to override it)."""
    given, i = {}, 0
    while i < len(args):
        name, text, used = _flag_in(args, i)
        if name == "flagfile":
            inner = FLAGS.read_flags_from_files([f"--flagfile={text}"], force_gnu=True)
            j = 0
            while j < len(inner):
                other, other_text, other_used = _flag_in(inner, j)
                if other in given and not _same_value(other, given[other], other_text):
                    raise FlagError(f"--{other}={given[other]} comes before --flagfile={text}, which sets "
                                    f"--{other}={other_text}: the flagfile would win; put --{other} after the "
                                    "--flagfile to override it")
                j += other_used
        elif name is not None:
            given[name] = text
        i += used


def _flagfile_paths_expanded(argv: list[str]) -> list[str]:
    return [f"--flagfile={expand(a.split('=', 1)[1])}" if a.startswith(("--flagfile=", "-flagfile=")) else a
            for a in argv]


def parse_flags(argv):
    """absl's parser, but a bad flag is one line on stderr and exit status 2 (no banner, no
    traceback): an unknown flag, a stray argument, a flag a later --flagfile would override."""
    argv = _flagfile_paths_expanded(list(argv))
    try:
        rest = FLAGS(argv)
        if len(rest) > 1:
            raise FlagError(f"unexpected argument {rest[1]!r}: flags are --name=value, and a list is one argument "
                            "without spaces (--images=a.png,b.png)")
        check_flagfile_order(argv[1:])
        return rest
    except (flags.Error, FlagError) as e:
        message = re.sub(r"^ERROR::\s*", "", " ".join(str(e).split()))
        print(f"error: {message.replace('Unable to open flagfile: ', 'cannot open a --flagfile: ')}", file=sys.stderr)
        sys.exit(2)


def console_main():
    """The `digits` console script (setup.cfg): the same flags as `python run_experiment.py`."""
    if __name__ != "__main__":  # --help lists the flags of the program run (sys.argv[0]): these are
        for flag in FLAGS.get_key_flags_for_module(__name__):
            FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console_main()
