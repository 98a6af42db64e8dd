"""A researcher's own layer kind, from a module outside the package (`--layer_modules`): the
contract example of docs/layers.md runs as written in every mode, a wrong backward FAILs the
gradient check, and a bad module is a one-line error."""

import json
import textwrap

import pytest

from cli import ENV, ROOT, run_cli
from digits import layers
from digits.config import Config

# The contract: docs/layers.md shows exactly this module, which is the file tested here.
GAIN = (ROOT / "docs" / "examples" / "my_layers.py").read_text()

# Another user kind with an argument and a deliberately wrong backward (dg twice too large).
WRONG = textwrap.dedent('''\
    import dataclasses
    import jax.numpy as jnp
    from digits import layers

    @layers.register("wrong_scale")
    @dataclasses.dataclass(frozen=True)
    class WrongScale(layers.Layer):
        start: float = 1.0

        def init(self, key, in_shape, dtype):
            return {"s": jnp.full((), self.start, dtype)}

        def forward(self, params, x, key=None):
            return x * params["s"], x

        def backward(self, params, x, dy, need_dx=True):
            return {"s": 2 * jnp.sum(dy * x)}, (dy * params["s"] if need_dx else None)
    ''')

TINY = ["--train_examples=500", "--validation_size=100"]
CHECK = TINY + ["--gradcheck_examples=8", "--gradcheck_coords=4"]
STACK = "--layers=conv3x3:8,gain,maxpool2,dense:10"


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_layers")
    (folder / "my_layers.py").write_text(GAIN)
    (folder / "wrong_layers.py").write_text(WRONG)
    (folder / "broken_layers.py").write_text("import not_a_module_anyone_has\n")
    (folder / "twice_layers.py").write_text(GAIN.replace('register("gain")', 'register("dense")'))
    (folder / "lacking_layers.py").write_text(GAIN.replace("def backward", "def not_backward"))
    return folder


def test_the_contract_example_in_every_mode(modules, cache_dir, tmp_path):
    env = {**ENV, "PYTHONPATH": f"{ENV['PYTHONPATH']}:{modules}"}  # importable by name
    check = run_cli("--mode=gradcheck", "--layer_modules=my_layers", STACK, "--x64", *CHECK,
                    f"--workdir={tmp_path / 'g'}", cache_dir=cache_dir, env=env)
    assert "Verdict: PASS" in check.stdout and "gain" in check.stdout
    assert "layer1.g" in check.stdout  # the user's leaf, checked against jax.grad and finite differences
    run = tmp_path / "run"
    train = run_cli("--layer_modules=my_layers", STACK, *TINY, "--optimizer=sgd", "--batch_size=50", "--epochs=1",
                    f"--workdir={run}", cache_dir=cache_dir, env=env)
    assert "conv3x3:8,relu,gain,maxpool2,dense:10" in train.stdout  # the effective stack in the header
    assert json.loads((run / "config.json").read_text())["config"]["layer_modules"] == ["my_layers"]
    evaluated = run_cli("--mode=eval", f"--workdir={run}", cache_dir=cache_dir, env=env)
    assert "test" in evaluated.stdout
    bench = run_cli("--mode=benchmark", "--layer_modules=my_layers",
                    "--bench_layer_sizes=conv3x3:8,gain,maxpool2,dense:10", "--bench_batch_sizes=10",
                    "--bench_steps_per_call=10", "--bench_repeats=1", *TINY,
                    f"--workdir={tmp_path / 'b'}", cache_dir=cache_dir, env=env)
    assert "manual" in bench.stdout and "autodiff" in bench.stdout and "gain" in bench.stdout


def test_a_wrong_user_backward_fails_the_gradient_check(modules, cache_dir, tmp_path):
    result = run_cli("--mode=gradcheck", f"--layer_modules={modules / 'wrong_layers.py'}",
                     "--layers=dense:8,wrong_scale:0.5,dense:10", "--x64", *CHECK, f"--workdir={tmp_path}",
                     cache_dir=cache_dir, check=False)
    assert result.returncode == 1 and "Verdict: FAIL" in result.stdout
    assert "layer1.s" in result.stdout and "FAIL" in result.stdout.split("layer1.s")[1].splitlines()[0]


@pytest.mark.parametrize("name,fragment", [
    ("missing_module_xyz", "layer_modules: cannot import missing_module_xyz: ModuleNotFoundError"),
    ("broken_layers.py", "cannot import"),
    ("twice_layers.py", "layer 'dense' is registered twice"),
    ("lacking_layers.py", "gain: class Gain lacks backward"),
    ("no_such_file.py", "no such file"),
])
def test_a_bad_module_is_a_one_line_error_naming_it(modules, name, fragment):
    module = name if name.startswith("missing") else str(modules / name)
    with pytest.raises(ValueError) as error:
        Config(layer_modules=(module,), layers="dense:10")
    message = str(error.value)
    assert fragment in message and "\n" not in message and (name in message or "gain" in message), message


def test_a_bad_module_on_the_command_line_exits_2_in_one_line(cache_dir):
    result = run_cli("--layer_modules=missing_module_xyz", "--layers=dense:10", cache_dir=cache_dir, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "missing_module_xyz" in result.stderr, result.stderr


def test_usage_lists_registered_kinds():
    text = layers.usage()
    for token in ("dense:N", "convKHxKW:F[:sS][:same]", "maxpoolP", "batchnorm[:momentum][:eps]", "res(<layers>)"):
        assert token in text


def test_an_activation_without_its_derivative_is_refused_at_registration():
    import dataclasses

    from digits.layers import activations

    @dataclasses.dataclass(frozen=True)
    class NoDerivative(activations._Activation):
        def forward(self, params, x, key=None):
            return x, x

    with pytest.raises(ValueError, match="no_derivative: class NoDerivative lacks derivative"):
        layers.register("no_derivative")(NoDerivative)
    assert "no_derivative" not in layers.registered()
