"""Training: loss goes down, resume is exact, K vmapped seeds equal K separate runs."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from digits import checkpoint, experiment, train
from digits.config import Config

SMALL = dict(train_examples=2000, validation_size=1000, layer_sizes=(784, 16, 10), optimizer="sgd", init="glorot",
             learning_rate=0.1, batch_size=50, epochs=3)


def _train_direct(config, splits, stop_at=None, state=None):
    """Runs the compiled chunks over [state.step, stop_at) like the experiment loop, without I/O."""
    run = experiment.Run.create(config, splits)
    state = run.init_state() if state is None else state
    images, labels = jnp.asarray(splits.train.images), jnp.asarray(splits.train.labels)
    chunk_fn = train.make_train_chunk(run.spec, run.tx, config.grad, config.batch_size or len(splits.train),
                                      run.steps_per_epoch, run.full_batch, config.audit_every, run.dtype)
    step = int(np.asarray(state.step).reshape(-1)[0])
    chunk = train.compile_chunk(chunk_fn, state, images, labels, run.permutation(state, 0), run.vmapped)
    losses = []
    while step < (stop_at or run.total_steps):
        end = min(run.chunk_end(step), stop_at or run.total_steps)
        state, stats = chunk(state, images, labels, run.permutation(state, step // run.steps_per_epoch), jnp.int32(end - step))
        losses.append(np.asarray(stats.loss_sum) / (end - step))
        step = end
    return run, state, losses


@pytest.fixture(scope="module")
def small_splits(mnist_splits):
    return dataclasses.replace(
        mnist_splits,
        train=type(mnist_splits.train)(mnist_splits.train.images[:2000], mnist_splits.train.labels[:2000]),
        validation=type(mnist_splits.train)(mnist_splits.validation.images[:1000], mnist_splits.validation.labels[:1000]),
    )


@pytest.mark.parametrize("grad", ["manual", "autodiff"])
def test_training_decreases_loss_and_beats_chance(small_splits, grad):
    config = Config(**SMALL, grad=grad)
    run, state, losses = _train_direct(config, small_splits)
    assert losses[-1] < 0.6 * losses[0]
    evaluate = jax.jit(train.make_evaluate(run.spec, jnp.float32))
    _, accuracy, _ = evaluate(state.params, jnp.asarray(small_splits.validation.images), jnp.asarray(small_splits.validation.labels))
    assert float(accuracy) > 0.7  # chance is 0.1


def test_manual_and_autodiff_training_agree(small_splits):
    _, manual, _ = _train_direct(Config(**SMALL, grad="manual"), small_splits)
    _, auto, _ = _train_direct(Config(**SMALL, grad="autodiff"), small_splits)
    chex.assert_trees_all_close(manual.params, auto.params, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_interrupted_and_resumed_from_checkpoint_equals_uninterrupted(small_splits, tmp_path, optimizer):
    config = Config(**{**SMALL, "optimizer": optimizer, "learning_rate": 0.01}, schedule="cosine")
    _, uninterrupted, _ = _train_direct(config, small_splits)
    run, partial, _ = _train_direct(config, small_splits, stop_at=70)  # mid-epoch
    checkpoint.save(tmp_path, 70, partial)
    restored, _ = checkpoint.restore(tmp_path, run.init_state())
    _, resumed, _ = _train_direct(config, small_splits, state=restored)
    chex.assert_trees_all_equal(resumed, uninterrupted)


def test_optimizer_matches_optax_reference():
    """Our learning-rate-outside-the-transformation form equals optax.adamw / sgd momentum."""
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = [{"w": jnp.array([0.1, 0.2, -0.3]) * (i + 1)} for i in range(5)]
    for name, reference in [("adamw", optax.adamw(0.01, weight_decay=1e-4)), ("momentum", optax.sgd(0.01, momentum=0.9)),
                            ("nesterov", optax.sgd(0.01, momentum=0.9, nesterov=True))]:
        ours = train.make_optimizer(Config(optimizer=name, learning_rate=0.01), total_steps=5, steps_per_epoch=5)
        p_ours, s_ours, p_ref, s_ref = params, ours.init(params), params, reference.init(params)
        for g in grads:
            u, s_ours = ours.update(g, s_ours, p_ours)
            p_ours = jax.tree.map(lambda p, u: p - 0.01 * u, p_ours, u)
            u, s_ref = reference.update(g, s_ref, p_ref)
            p_ref = optax.apply_updates(p_ref, u)
        chex.assert_trees_all_close(p_ours, p_ref, rtol=1e-6)


def test_vmapped_seeds_equal_separate_runs(small_splits):
    config = Config(**SMALL, num_seeds=3, seed=5)
    _, stacked, _ = _train_direct(config, small_splits)
    for lane in range(3):
        _, alone, _ = _train_direct(dataclasses.replace(config, num_seeds=1, seed=5 + lane), small_splits)
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[lane], stacked.params), alone.params, atol=1e-6, rtol=1e-5)


def test_learning_rate_sweep_lanes_use_their_rates(small_splits):
    config = Config(**{**SMALL, "epochs": 1}, sweep_learning_rates=(0.01, 0.2))
    _, stacked, _ = _train_direct(config, small_splits)
    np.testing.assert_allclose(np.asarray(stacked.learning_rate), [0.01, 0.2])
    _, alone, _ = _train_direct(dataclasses.replace(config, sweep_learning_rates=(), learning_rate=0.2), small_splits)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], stacked.params), alone.params, atol=1e-6, rtol=1e-5)


def test_chunks_of_any_length_share_one_compilation(small_splits):
    config = Config(**SMALL)
    run = experiment.Run.create(config, small_splits)
    chunk_fn = chex.assert_max_traces(n=1)(
        train.make_train_chunk(run.spec, run.tx, "manual", 50, run.steps_per_epoch, False, 0, jnp.float32))
    jitted = jax.jit(chunk_fn, donate_argnums=0)
    state = run.init_state()
    images, labels = jnp.asarray(small_splits.train.images), jnp.asarray(small_splits.train.labels)
    perm = run.permutation(state, 0)
    for steps in (1, 7, 13):
        state, _ = jitted(state, images, labels, perm, jnp.int32(steps))
    assert int(state.step) == 21


def test_divergence_is_reported_with_its_step(small_splits):
    config = Config(**{**SMALL, "learning_rate": 1e30})
    _, state, _ = _train_direct(config, small_splits, stop_at=5)
    run = experiment.Run.create(config, small_splits)
    images, labels = jnp.asarray(small_splits.train.images), jnp.asarray(small_splits.train.labels)
    chunk = train.compile_chunk(train.make_train_chunk(run.spec, run.tx, "manual", 50, run.steps_per_epoch, False, 0, jnp.float32),
                                run.init_state(), images, labels, run.permutation(state, 0), False)
    _, stats = chunk(run.init_state(), images, labels, run.permutation(state, 0), jnp.int32(30))
    assert 0 <= int(stats.first_bad_step) < 30


def test_grad_both_audits_agreement(small_splits):
    config = Config(**{**SMALL, "epochs": 1}, grad="both", audit_every=10)
    run = experiment.Run.create(config, small_splits)
    images, labels = jnp.asarray(small_splits.train.images), jnp.asarray(small_splits.train.labels)
    state = run.init_state()
    perm = run.permutation(state, 0)
    chunk = train.compile_chunk(train.make_train_chunk(run.spec, run.tx, "both", 50, run.steps_per_epoch, False, 10, jnp.float32),
                                state, images, labels, perm, False)
    _, stats = chunk(state, images, labels, perm, jnp.int32(40))
    assert int(stats.audit_count) == 4
    assert 0 < float(stats.audit_max_rel_error) < 1e-5


def test_flops_per_example_counts_forward_and_backward():
    # 784-30-10: forward 2*(784*30 + 30*10); dW the same; dA only for the second layer: 2*30*10.
    assert train.flops_per_example((784, 30, 10)) == 2 * (784 * 30 + 30 * 10) * 2 + 2 * 30 * 10
