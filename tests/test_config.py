"""Config validates itself (the same one-line ValueError in a notebook as on the command line), and
the command line's flags are derived from its declarations."""

import dataclasses
import json
import math
import pathlib

import pytest
from absl import flags

import run_experiment
from digits import config as config_lib
from digits.config import Config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kwargs,match", [
    ({"schedule": "cosin"}, "schedule must be one of"),
    ({"grad": "Autodiff"}, "grad must be one of"),
    ({"optimizer": "rmsprop"}, "optimizer must be one of"),
    ({"activation": "swish"}, "activation must be one of"),
    ({"learning_rate": math.nan}, "learning_rate must be a finite number"),
    ({"learning_rate": math.inf}, "learning_rate must be a finite number"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"l2": -1.0}, "l2 must be >= 0"),
    ({"momentum": 1.0}, "momentum must be >= 0 and < 1"),
    ({"init_scale": math.nan}, "init_scale must be a finite"),
    ({"decay_rate": -0.5}, "decay_rate must be > 0"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"batch_size": -1}, "batch_size must be >= 0"),
    ({"num_seeds": 0}, "num_seeds must be >= 1"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"x64": "yes"}, "x64 must be true or false"),
    ({"layer_sizes": (784,)}, "layer_sizes needs at least"),
    ({"layer_sizes": (784, 0, 10)}, "layer_sizes needs at least"),
    ({"layer_sizes": "784,x,10"}, "layer_sizes: expected comma-separated integers"),
    ({"sweep_learning_rates": (0.1, math.nan)}, "sweep_learning_rates must be a finite"),
    ({"sweep_learning_rates": (0.1, -0.1)}, "sweep_learning_rates must be > 0"),
    ({"sweep_learning_rates": (0.1, 0.1)}, "repeats a value"),
    ({"optimizer": "gd", "batch_size": 10}, "optimizer=gd is full-batch"),
    ({"audit_every": 10}, "audit_every needs grad=both"),
    ({"data_source": "idx"}, "data_source=idx needs idx_dir"),
    ({"schedule": "warmup_cosine", "warmup_steps": 500, "steps": 500}, "warmup_steps=500 must be below"),
    ({"warmup_steps": 5}, "warmup_steps needs schedule=warmup_cosine"),
    ({"decay_steps": 5}, "decay_steps needs schedule=exponential"),
    ({"train_examples": 100, "batch_size": 200, "optimizer": "sgd"}, "exceeds train_examples"),
    ({"bench_grads": ("both",)}, "bench_grads must be one of"),
    ({"bench_batch_sizes": ()}, "bench_batch_sizes must not be empty"),
    ({"bench_platform": "abacus"}, "bench_platform must be one of"),
    ({"augment_scale": 1.0}, "augment_scale must be >= 0 and < 1"),
])
def test_bad_values_are_refused_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as caught:
        Config(**kwargs)
    assert "\n" not in str(caught.value)


def test_defaults_are_valid_and_lists_become_tuples():
    config = Config(layer_sizes=[784, 30, 10], sweep_learning_rates=[1, 2], learning_rate=1)
    assert config.layer_sizes == (784, 30, 10) and config.sweep_learning_rates == (1.0, 2.0)
    assert isinstance(config.learning_rate, float)
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_old_names_still_load():
    """config.json of an older workdir (l2_per_example, since renamed) still reads."""
    old = {**Config().to_dict(), "l2_per_example": True}
    del old["l2_over_train_size"]
    assert Config.from_dict(old).l2_over_train_size
    assert Config(l2=5.0, l2_over_train_size=True).l2_coefficient(50000) == 5.0 / 50000


def test_fingerprint_follows_the_declarations():
    base = Config()
    assert base.training_fingerprint() == dataclasses.replace(base, cache_dir="/x", keep_checkpoints=9,
                                                              bench_repeats=2).training_fingerprint()
    assert base.training_fingerprint() != dataclasses.replace(base, learning_rate=0.2).training_fingerprint()


def test_every_field_has_a_flag_with_its_default_and_help():
    for f in config_lib.fields():
        flag = run_experiment.FLAGS[f.name]
        assert flag.help.endswith(f.metadata["help"]) and f.metadata["help"]
        parsed = f.metadata["parse"](flag.default) if config_lib.is_tuple(f) else flag.default
        assert parsed == f.default, f.name


def test_config_from_flags_equals_the_default_config():
    assert run_experiment.config_from(run_experiment.FLAGS) == Config()


def _parse(*argv):
    values = flags.FlagValues()
    run_experiment.define_config_flags(values)
    values(["prog", *argv])
    return run_experiment.config_from(values)


def test_flags_parse_into_the_config():
    config = _parse("--layer_sizes=784,30,10", "--sweep_learning_rates=0.1,0.2", "--bench_batch_sizes=10,full",
                    "--bench_layer_sizes=784,10,10;conv5x5:4,maxpool2,dense:10", "--l2_per_example")
    assert config.layer_sizes == (784, 30, 10) and config.sweep_learning_rates == (0.1, 0.2)
    assert config.bench_batch_sizes == (10, 0) and config.l2_over_train_size
    assert config.bench_layer_sizes == ("784,10,10", "conv5x5:4,maxpool2,dense:10")


def test_non_finite_flag_values_are_flag_errors():
    with pytest.raises(run_experiment.FlagError, match="--learning_rate must be a finite number, got nan"):
        _parse("--learning_rate=nan")


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.cfg")), ids=lambda p: p.name)
def test_every_flagfile_parses_into_a_valid_config(path):
    config = run_experiment.config_from_flagfile(str(path))
    assert isinstance(config, Config)
