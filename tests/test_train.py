"""Training through the real loop (`train.fit`): loss goes down, each epoch is reshuffled, resume
is exact, K vmapped seeds equal K separate runs, divergence and the audit are reported."""

import dataclasses
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from digits import backprop, checkpoint, compiling, data, model, train
from digits.config import Config

SMALL = dict(layer_sizes=(784, 16, 10), optimizer="sgd", init="glorot", learning_rate=0.1, batch_size=50, epochs=3)


@pytest.fixture(scope="module")
def small(mnist_splits):
    """2000 train, 1000 validation, 1000 test images of the packaged MNIST."""

    def cut(split, n):
        return data.Split(split.images[:n], split.labels[:n])

    return dataclasses.replace(mnist_splits, train=cut(mnist_splits.train, 2000),
                               validation=cut(mnist_splits.validation, 1000), test=cut(mnist_splits.test, 1000))


class Recorder(train.Hooks):
    """Keeps every metrics record; optionally checkpoints and stops at `stop_at` (like Ctrl-C)."""

    class Stop(Exception):
        pass

    def __init__(self, stop_at=None, directory=None):
        self.records, self.stop_at, self.directory = [], stop_at, directory

    def after_chunk(self, step, state):
        if self.stop_at is not None and step >= self.stop_at:
            checkpoint.save(self.directory, step, state)
            raise Recorder.Stop

    def after_eval(self, step, state, record):
        self.records.append(record)


def fit(config, dataset, state=None, hooks=(), best=None):
    plan = train.Plan.create(config, dataset)
    state = plan.init_state() if state is None else state
    return plan, train.fit(plan, state, train.device_splits(dataset), hooks, best)


@pytest.mark.parametrize("grad", ["manual", "autodiff"])
def test_training_decreases_loss_and_beats_chance(small, grad):
    recorder = Recorder()
    _, result = fit(Config(**SMALL, grad=grad), small, hooks=[recorder])
    losses = [r["loss"] for r in recorder.records]
    assert [r["step"] for r in recorder.records] == [40, 80, 120]
    assert losses[-1] < 0.6 * losses[0]
    assert recorder.records[-1]["validation_accuracy"] > 0.7  # chance is 0.1
    assert result.steps_done == 120 and result.timings(train.Plan.create(Config(**SMALL), small))["examples_per_s"] > 0


def test_train_accuracy_is_measured_on_the_prefix_it_is_given(small):
    """--train_accuracy_examples: the train accuracy of the first N images, or none at all."""
    plan = train.Plan.create(dataclasses.replace(Config(**SMALL), epochs=1), small)
    records = {}
    for n in (0, 300):
        recorder = Recorder()
        result = train.fit(plan, plan.init_state(), train.device_splits(small, train_accuracy_examples=n), [recorder])
        records[n] = recorder.records[-1]
    assert np.isnan(records[0]["train_accuracy"])
    assert 0.5 < records[0]["validation_accuracy"] == records[300]["validation_accuracy"]
    logits = model.logits(result.state.params, model.inputs(jnp.asarray(small.train.images), plan.spec), plan.spec)
    correct = np.argmax(logits, -1) == small.train.labels
    assert records[300]["train_accuracy"] == pytest.approx(np.mean(correct[:300]))
    assert np.mean(correct[:300]) != np.mean(correct)  # (so the prefix is what was measured)


def _reference_sgd(config, dataset, reshuffle: bool):
    """Plain SGD written out step by step, with a fresh permutation per epoch (or epoch 0's forever)."""
    plan = train.Plan.create(config, dataset)
    state = plan.init_state()
    step_fn = jax.jit(lambda p, x, y: backprop.value_and_grad(p, (x, y), plan.spec)[1])
    params, images, labels = state.params, jnp.asarray(dataset.train.images), jnp.asarray(dataset.train.labels)
    for epoch in range(config.epochs):
        perm = train.epoch_permutation(state.data_key, epoch if reshuffle else 0, len(dataset.train))
        for i in range(plan.steps_per_epoch):
            idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
            grads = step_fn(params, model.inputs(images[idx], plan.spec), labels[idx])
            params = jax.tree.map(lambda p, g: p - config.learning_rate * g, params, grads)
    return params


def test_the_loop_reshuffles_every_epoch(small):
    """Fails if the loop reuses one data order: the real loop must equal SGD with per-epoch permutations."""
    config = Config(**{**SMALL, "epochs": 2})
    _, result = fit(config, small)
    chex.assert_trees_all_close(result.state.params, _reference_sgd(config, small, reshuffle=True),
                                atol=1e-5, rtol=1e-4)
    stale = _reference_sgd(config, small, reshuffle=False)  # the test can tell the two apart
    assert max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(stale), strict=True)) > 1e-3


def test_manual_and_autodiff_training_agree(small):
    _, manual = fit(Config(**SMALL, grad="manual"), small)
    _, auto = fit(Config(**SMALL, grad="autodiff"), small)
    chex.assert_trees_all_close(manual.state.params, auto.state.params, atol=2e-4, rtol=1e-3)


def test_two_runs_give_bit_identical_metrics(small):
    """Same seed, same machine: identical numbers (what the results table calls exact)."""
    first, second = Recorder(), Recorder()
    fit(Config(**{**SMALL, "epochs": 2}), small, hooks=[first])
    fit(Config(**{**SMALL, "epochs": 2}), small, hooks=[second])

    def strip(records):
        return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in records]

    assert strip(first.records) == strip(second.records)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_interrupted_and_resumed_from_checkpoint_equals_uninterrupted(small, tmp_path, optimizer):
    config = Config(**{**SMALL, "optimizer": optimizer, "learning_rate": 0.01}, schedule="cosine", steps_per_call=35)
    _, uninterrupted = fit(config, small)
    with pytest.raises(Recorder.Stop):
        fit(config, small, hooks=[Recorder(stop_at=70, directory=tmp_path)])  # mid-epoch
    plan = train.Plan.create(config, small)
    restored, _ = checkpoint.restore(tmp_path, plan.init_state())
    assert int(restored.step) == 70
    _, resumed = fit(config, small, state=restored)
    chex.assert_trees_all_equal(resumed.state, uninterrupted.state)


def assert_optimizer_matches(config: Config, reference: optax.GradientTransformation):
    """Five steps of make_optimizer(config) at learning rate 0.01 equal those of `reference`."""
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = [{"w": jnp.array([0.1, 0.2, -0.3]) * (i + 1)} for i in range(5)]
    ours = train.make_optimizer(dataclasses.replace(config, learning_rate=0.01), total_steps=5, steps_per_epoch=5)
    p_ours, s_ours, p_ref, s_ref = params, ours.init(params), params, reference.init(params)
    for g in grads:
        u, s_ours = ours.update(g, s_ours, p_ours)
        p_ours = jax.tree.map(lambda p, u: p - 0.01 * u, p_ours, u)
        u, s_ref = reference.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    chex.assert_trees_all_close(p_ours, p_ref, rtol=1e-6)


def test_optimizer_matches_optax_reference():
    """Our learning-rate-outside-the-transformation form equals optax.adamw / sgd momentum."""
    references = [("adamw", optax.adamw(0.01, weight_decay=1e-4)), ("momentum", optax.sgd(0.01, momentum=0.9)),
                  ("nesterov", optax.sgd(0.01, momentum=0.9, nesterov=True)), ("sgd", optax.sgd(0.01)),
                  ("gd", optax.sgd(0.01))]
    for name, reference in references:
        assert_optimizer_matches(Config(optimizer=name), reference)


def test_vmapped_seeds_equal_separate_runs(small):
    config = Config(**SMALL, num_seeds=3, seed=5)
    _, stacked = fit(config, small)
    for lane in range(3):
        _, alone = fit(dataclasses.replace(config, num_seeds=1, seed=5 + lane), small)
        one_lane = jax.tree.map(lambda x, lane=lane: x[lane], stacked.state.params)
        chex.assert_trees_all_close(one_lane, alone.state.params,
                                    atol=1e-6, rtol=1e-5)


def test_learning_rate_sweep_lanes_use_their_rates(small):
    config = Config(**{**SMALL, "epochs": 1}, sweep_learning_rates=(0.01, 0.2))
    plan, stacked = fit(config, small)
    np.testing.assert_allclose(np.asarray(stacked.state.learning_rate), [0.01, 0.2])
    assert plan.model_lanes() == [{"seed": 0, "learning_rate": 0.01}, {"seed": 0, "learning_rate": 0.2}]
    _, alone = fit(dataclasses.replace(config, sweep_learning_rates=(), learning_rate=0.2), small)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], stacked.state.params), alone.state.params,
                                atol=1e-6, rtol=1e-5)


def test_chunks_of_any_length_share_one_compilation(small):
    plan = train.Plan.create(Config(**SMALL), small)
    jitted = jax.jit(chex.assert_max_traces(n=1)(plan.make_chunk()), donate_argnums=0)
    state = plan.init_state()
    images, labels = train.device_splits(small)["train"]
    perm = plan.permutation(0)
    for steps in (1, 7, 13):
        state, _ = jitted(state, images, labels, perm, jnp.int32(steps))
    assert int(state.step) == 21


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the option is for XLA:CPU")
@pytest.mark.parametrize("layers, choice, off", [
    ("conv3x3:4,maxpool2,dense:10", "auto", True), ("", "auto", False), ("conv3x3:4,batchnorm,dense:10", "auto", False),
    ("conv3x3:4:same,res(conv3x3:4:same,layernorm),maxpool2,dense:10", "auto", False),
    ("conv3x3:4,maxpool2,dense:10", "on", False), ("", "off", True)])
def test_cpu_ynn_fusions_choose_the_chunk_compiler_options(small, layers, choice, off):
    plan = train.Plan.create(Config(**SMALL, layers=layers, cpu_ynn_fusions=choice), small)
    assert train.chunk_compiler_options(plan) == ({train.YNN_FUSION_OPTION: ""} if off else {})


def _compiled_steps(plan, small):
    state, (images, labels) = plan.init_state(), train.device_splits(small)["train"]
    compiled = train.compile_chunk(plan, state, images, labels, plan.permutation(0))
    return int(compiled(state, images, labels, plan.permutation(0), jnp.int32(2))[0].step)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the option is for XLA:CPU")
def test_this_xla_takes_the_ynn_option_and_one_it_lacks_falls_back_with_a_warning(small, monkeypatch):
    plan = train.Plan.create(Config(**SMALL, cpu_ynn_fusions="off"), small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real option compiles, with no fallback
        assert _compiled_steps(plan, small) == 2
    monkeypatch.setattr(train, "chunk_compiler_options", lambda plan: {"xla_cpu_no_such_option_in_any_xla": ""})
    with pytest.warns(UserWarning, match="rejects the compiler options"):
        assert _compiled_steps(plan, small) == 2


def test_divergence_stops_the_loop_with_its_step_and_rate(small):
    with pytest.raises(train.Diverged, match=r"at step \d+ with learning rate 1e\+30") as caught:
        fit(Config(**{**SMALL, "learning_rate": 1e30}), small)
    assert 0 <= caught.value.step < 40


def test_one_diverging_model_of_several_goes_on(small):
    seen = []

    class Watch(train.Hooks):
        def model_diverged(self, lane, error):
            seen.append((lane, error.learning_rate))

    _, result = fit(Config(**{**SMALL, "epochs": 1}, sweep_learning_rates=(0.1, 1e30)), small, hooks=[Watch()])
    assert [lane for lane, _ in seen] == [1] and seen[0][1] == pytest.approx(1e30, rel=1e-6)
    assert result.diverged.tolist() == [False, True]


def test_grad_both_audits_agreement(small):
    _, result = fit(Config(**{**SMALL, "epochs": 1}, grad="both", audit_every=10), small)
    assert result.audit["count"] == 4 and result.audit["passed"]
    assert 0 <= result.audit["max_violation"] <= 1 and result.audit["max_relative_error"] < 1e-5


def test_full_batch_rule_is_one_rule():
    assert train.is_full_batch(0, 100) and train.is_full_batch(100, 100) and not train.is_full_batch(99, 100)
    assert train.steps_per_epoch(100, 0) == train.steps_per_epoch(100, 100) == 1
    assert train.steps_per_epoch(100, 30) == 3
    with pytest.raises(ValueError, match="batch_size=101"):
        train.steps_per_epoch(100, 101)


def test_plan_refuses_a_network_that_does_not_fit_the_data(small):
    with pytest.raises(ValueError, match="must start with 784"):
        train.Plan.create(Config(layer_sizes=(100, 10)), small)
    with pytest.raises(ValueError, match="batch_size=5000 exceeds"):
        train.Plan.create(Config(**{**SMALL, "batch_size": 5000}), small)


CONV = dict(layers="conv3x3:4,maxpool2,dropout:0.25,dense:10", activation="relu", optimizer="sgd", init="glorot",
            learning_rate=0.05, batch_size=20, epochs=2, augment_shift=1)


@pytest.fixture(scope="module")
def tiny(small):

    def cut(split, n):
        return data.Split(split.images[:n], split.labels[:n])

    return dataclasses.replace(small, train=cut(small.train, 400), validation=cut(small.validation, 200))


def test_a_conv_stack_with_dropout_and_shifts_trains_and_resumes_exactly(tiny, tmp_path):
    recorder = Recorder()
    config = Config(**CONV, steps_per_call=7)
    _, uninterrupted = fit(config, tiny, hooks=[recorder])
    assert recorder.records[-1]["loss"] < recorder.records[0]["loss"] or recorder.records[-1]["loss"] < 2.0
    with pytest.raises(Recorder.Stop):
        fit(config, tiny, hooks=[Recorder(stop_at=14, directory=tmp_path)])  # mid-epoch
    restored, _ = checkpoint.restore(tmp_path, train.Plan.create(config, tiny).init_state())
    _, resumed = fit(config, tiny, state=restored)
    chex.assert_trees_all_equal(resumed.state, uninterrupted.state)  # same masks and shifts after resume


def test_vmapped_conv_models_equal_separate_runs(tiny):
    config = Config(**CONV, num_seeds=2)
    _, stacked = fit(config, tiny)
    _, alone = fit(dataclasses.replace(config, num_seeds=1, seed=1), tiny)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], stacked.state.params), alone.state.params,
                                atol=1e-5, rtol=1e-4)


def test_manual_and_autodiff_agree_on_a_relu_conv_stack_at_zero_bias_init(tiny):
    """MNIST's black background makes many conv pre-activations exactly 0 at zero-bias init:
    backprop and jax.grad must use the same relu'(0) there."""
    from digits import gradcheck

    plan = train.Plan.create(Config(layers="conv3x3:4,maxpool2,conv3x3:4,dense:10", init="he"), tiny)
    params = model.init(jax.random.PRNGKey(0), plan.spec)
    batch = (model.inputs(jnp.asarray(tiny.train.images[:32]), plan.spec), jnp.asarray(tiny.train.labels[:32]))
    _, manual = jax.jit(backprop.value_and_grad, static_argnums=2)(params, batch, plan.spec)
    _, auto = jax.jit(backprop.autodiff_value_and_grad, static_argnums=2)(params, batch, plan.spec)
    violation, _, _ = gradcheck.tree_agreement(manual, auto)
    assert float(violation) <= 1.0


def test_cpu_programs_compile_at_o2_unless_xla_flags_give_a_level(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    assert compiling.options("cpu") == {compiling.OPT_LEVEL_OPTION: 2} and compiling.options("gpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")  # as the tests run
    assert compiling.options("cpu") == {}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU's")
def test_the_options_reach_every_kind_of_compiled_program(small, monkeypatch):
    plan = train.Plan.create(Config(**SMALL), small)
    state, (images, labels) = plan.init_state(), train.device_splits(small)["train"]
    monkeypatch.setattr(compiling, "options", lambda platform=None: {"xla_cpu_no_such_option_in_any_xla": 1})
    with pytest.raises(jax.errors.JaxRuntimeError, match="no_such_option"):
        train.compile_chunk(plan, state, images, labels, plan.permutation(0))
    with pytest.raises(jax.errors.JaxRuntimeError, match="no_such_option"):
        train.Evaluator(plan.spec, plan.dtype, vmapped=False)(state.params, images, labels)
    with pytest.raises(jax.errors.JaxRuntimeError, match="no_such_option"):
        compiling.jit(lambda x: x + 1)(jnp.float32(1))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the option is for XLA:CPU")
def test_programs_compiled_at_o2_agree_with_o3_to_rounding(small):
    # Not always bit for bit: 4 of this 3x3x1x4 kernel's 36 initial weights differ by 1 ulp (the
    # speedrun's and chapter 6's nets were bit-identical over 600 steps; docs/performance.md).
    config = Config(**{**SMALL, "layers": "conv3x3:4,maxpool2,dense:10", "init": "he"},
                    cpu_ynn_fusions="on")  # the opt level alone differs
    plan = train.Plan.create(config, small)
    at = lambda level: {compiling.OPT_LEVEL_OPTION: level}  # noqa: E731
    args = (jnp.int32(3), 0.1, plan.spec, plan.tx, plan.dtype, False)
    init = train._compiled_init_state.__wrapped__
    o3_init = jax.jit(init, static_argnums=(2, 3, 4, 5), compiler_options=at(3))(*args)
    chex.assert_trees_all_close(jax.jit(init, static_argnums=(2, 3, 4, 5), compiler_options=at(2))(*args), o3_init,
                                rtol=1e-6, atol=0)
    images, labels = train.device_splits(small)["train"]
    perm = plan.permutation(0)
    fresh = lambda: jax.tree.map(jnp.copy, o3_init)  # noqa: E731  (the chunks donate their state)
    o2, o3 = (jax.jit(plan.make_chunk(), donate_argnums=0, compiler_options=at(level))(
        fresh(), images, labels, perm, jnp.int32(3)) for level in (2, 3))
    chex.assert_trees_all_close(o2, o3, rtol=1e-5, atol=1e-7)


def test_compiling_jit_inside_another_jit_becomes_part_of_it():
    double = compiling.jit(lambda x: 2 * x)
    assert float(jax.jit(lambda x: double(x) + 1)(jnp.float32(3))) == 7.0 == float(double(3.0) + 1)
    assert float(jax.jit(lambda x: double(3.0) + x)(jnp.float32(1))) == 7.0  # no traced argument
    assert float(jax.lax.fori_loop(0, 2, lambda i, x: double(x), jnp.float32(1))) == 4.0
    chex.assert_trees_all_equal(jax.vmap(double)(jnp.arange(3.0)), jnp.array([0.0, 2.0, 4.0]))
