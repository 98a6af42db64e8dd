"""The training options for accuracy at speed (issue 14): evaluation sized by memory, one-cycle,
Adam's betas, label smoothing in the hand-derived delta, the EMA of the parameters, selection by
best validation accuracy, --target_accuracy, and the wall-time / peak-memory record."""

import collections
import dataclasses
import json
import os
import signal
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from digits import backprop, checkpoint, data, experiment, gradcheck, losses, model, parallel, predict, train
from digits.config import Config
from test_train import Recorder, assert_optimizer_matches, fit

CONV_15MIN = "conv5x5:20,maxpool2,conv5x5:40,maxpool2,dropout:0.5,dense:500,dropout:0.5,dense:10"
TINY = dict(layer_sizes=(784, 16, 10), init="glorot", optimizer="sgd", learning_rate=0.1, batch_size=20, epochs=2)


@pytest.fixture(scope="module")
def tiny(mnist_splits):
    """400 train, 200 validation, 200 test images."""
    cut = lambda split, n: data.Split(split.images[:n], split.labels[:n])  # noqa: E731
    return dataclasses.replace(mnist_splits, train=cut(mnist_splits.train, 400),
                               validation=cut(mnist_splits.validation, 200), test=cut(mnist_splits.test, 200))


# --- evaluation sized by memory --------------------------------------------------------------------


def test_evaluation_batches_keep_the_conv_nets_temporaries_within_the_budget():
    spec = model.spec_from_text(CONV_15MIN, (28, 28), init="he")
    assert train.eval_memory_budget("cpu") == train.CPU_EVAL_MEMORY_BUDGET < train.eval_memory_budget("gpu")
    assert parallel.SINGLE.platform == "cpu"  # (the tests' platform: CPU evaluation gets the CPU's budget)
    batch = train.eval_batch_size(spec, jnp.float32, budget=train.EVAL_MEMORY_BUDGET)
    assert 100 <= batch <= 400  # was 10,000: 2.56 GB of im2col patches
    per_example = train.eval_bytes_per_example(spec, jnp.float32)
    for budget in (train.EVAL_MEMORY_BUDGET, train.CPU_EVAL_MEMORY_BUDGET):
        assert train.eval_batch_size(spec, jnp.float32, models=4, budget=budget) == budget // (4 * per_example)
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), spec))
        images, labels = jax.ShapeDtypeStruct((2000, 28, 28), jnp.uint8), jax.ShapeDtypeStruct((2000,), jnp.int32)
        evaluate = train.make_evaluate(spec, jnp.float32, train.eval_batch_size(spec, jnp.float32, budget=budget))
        compiled = jax.jit(evaluate).lower(params, images, labels, model.init_state(spec)).compile()
        # (plus the padded copy of the split's uint8 images, which no batch size changes)
        assert compiled.memory_analysis().temp_size_in_bytes <= budget + 2000 * 28 * 28
    dense = model.MLPSpec((784, 800, 800, 10))
    assert 1000 <= train.eval_batch_size(dense, jnp.float32, budget=train.EVAL_MEMORY_BUDGET) <= train.MAX_EVAL_BATCH
    assert 800 <= train.eval_batch_size(dense, jnp.float32, budget=train.CPU_EVAL_MEMORY_BUDGET)


def test_the_evaluation_batch_changes_no_prediction(tiny):
    spec = model.spec_from_text("conv3x3:2,maxpool2,dense:10", (28, 28), init="he")
    params = model.init(jax.random.PRNGKey(0), spec)
    images, labels = jnp.asarray(tiny.validation.images), jnp.asarray(tiny.validation.labels)
    state = model.init_state(spec)
    whole = jax.jit(train.make_evaluate(spec, jnp.float32, 200))(params, images, labels, state)
    for batch in (23,):  # 9 batches of 23, 7 padding images
        found = jax.jit(train.make_evaluate(spec, jnp.float32, batch))(params, images, labels, state)
        np.testing.assert_array_equal(found[2], whole[2])
        np.testing.assert_array_equal(found[3], whole[3])  # the probabilities an ensemble averages
        np.testing.assert_allclose(found[3].sum(axis=1), 1.0, rtol=1e-6)
        assert float(found[1]) == float(whole[1])
        np.testing.assert_allclose(float(found[0]), float(whole[0]), rtol=1e-6)


# --- one-cycle and Adam ------------------------------------------------------------------------------


def test_one_cycle_rises_to_the_peak_then_anneals_as_optax_does():
    config = Config(optimizer="sgd", batch_size=10, schedule="one_cycle", steps=100)
    shape = train.lr_multiplier(config, 100, 10)
    steps = jnp.arange(101)
    values = np.asarray(jax.vmap(shape)(steps))
    np.testing.assert_allclose(values[[0, 30, 100]], [1 / 25, 1.0, 1 / (25 * 1e4)], rtol=1e-5)
    assert np.all(np.diff(values[:31]) > 0) and np.all(np.diff(values[30:]) < 0)
    reference = optax.cosine_onecycle_schedule(100, 1.0)  # pct_start 0.3, div 25, final_div 1e4
    np.testing.assert_allclose(values, jax.vmap(reference)(steps), rtol=1e-5)
    peaked = train.lr_multiplier(dataclasses.replace(config, warmup_steps=10, one_cycle_div_factor=10.0), 100, 10)
    assert float(peaked(10)) == pytest.approx(1.0) and float(peaked(0)) == pytest.approx(0.1)
    assert float(peaked(5)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cosine: halfway at the middle


def test_one_cycle_and_adam_options_are_refused_where_they_mean_nothing(tiny):
    with pytest.raises(ValueError, match="one_cycle_div_factor needs schedule=one_cycle"):
        Config(one_cycle_div_factor=10.0)
    with pytest.raises(ValueError, match="warmup_steps=500 must be below steps=500 for one_cycle"):
        Config(schedule="one_cycle", warmup_steps=500)
    with pytest.raises(ValueError, match="adam_b1 needs optimizer=adam or adamw"):
        Config(optimizer="sgd", batch_size=10, adam_b1=0.7)
    with pytest.raises(ValueError, match="adam_b2 must be >= 0 and < 1, got 1"):
        Config(optimizer="adam", adam_b2=1.0)
    with pytest.raises(ValueError, match=r"warmup_steps=40 must be below the run's 40 steps"):
        train.Plan.create(Config(**TINY, schedule="one_cycle", warmup_steps=40), tiny)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_betas_and_epsilon_reach_the_optimizer(name):
    config = Config(optimizer=name, adam_b1=0.7, adam_b2=0.9, adam_eps=1e-3)
    reference = (optax.adam(0.01, b1=0.7, b2=0.9, eps=1e-3) if name == "adam"
                 else optax.adamw(0.01, b1=0.7, b2=0.9, eps=1e-3, weight_decay=1e-4))
    assert_optimizer_matches(config, reference)


# --- label smoothing ----------------------------------------------------------------------------


def test_smoothed_targets_sum_to_one():
    spec = dataclasses.replace(model.MLPSpec((4, 5)), label_smoothing=0.1)
    y = losses.targets(jnp.array([0, 3]), spec, jnp.float32)
    np.testing.assert_allclose(y, [[0.92, 0.02, 0.02, 0.02, 0.02], [0.02, 0.02, 0.02, 0.92, 0.02]], rtol=1e-6)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dataclasses.replace(model.MLPSpec((4, 5)), label_smoothing=1.0)


def _smoothing_problem(output, cost, dtype, smoothing, layers="dense:6,dense:5"):
    spec = model.spec_from_text(layers, (8, 8), activation="tanh", output=output, cost=cost, init="glorot")
    spec = dataclasses.replace(spec, label_smoothing=smoothing)
    params = model.init(jax.random.PRNGKey(1), spec, dtype)
    x = jax.random.uniform(jax.random.PRNGKey(2), (16, 64), dtype)
    return spec, params, (x, jax.random.randint(jax.random.PRNGKey(3), (16,), 0, 5))


@pytest.mark.parametrize("output,cost", [("softmax", "cross_entropy"), ("sigmoid", "cross_entropy"),
                                         ("softmax", "quadratic"), ("sigmoid", "quadratic")])
def test_label_smoothing_in_the_hand_derived_delta_matches_jax_grad(output, cost):
    spec, params, batch = _smoothing_problem(output, cost, jnp.float32, 0.2)
    assert gradcheck.verdict(gradcheck.against_autodiff(params, batch, spec))
    _, plain = backprop.value_and_grad(params, batch, dataclasses.replace(spec, label_smoothing=0.0))
    _, smoothed = backprop.value_and_grad(params, batch, spec)
    assert not np.allclose(plain[-1]["b"], smoothed[-1]["b"])  # smoothing changes the gradient


@pytest.mark.parametrize("output,cost", [("softmax", "cross_entropy"), ("sigmoid", "quadratic")])
def test_label_smoothing_gradients_agree_in_float64(output, cost):
    with jax.enable_x64(True):
        spec, params, batch = _smoothing_problem(output, cost, jnp.float64, 0.1)
        loss, manual = jax.jit(backprop.value_and_grad, static_argnums=2)(params, batch, spec)
        auto_loss, auto = jax.jit(backprop.autodiff_value_and_grad, static_argnums=2)(params, batch, spec)
        assert abs(float(loss - auto_loss)) <= 1e-12
        for m, a in zip(jax.tree.leaves(manual), jax.tree.leaves(auto), strict=True):
            assert m.dtype == jnp.float64
            np.testing.assert_allclose(m, a, rtol=1e-9, atol=1e-13)


def test_evaluation_loss_is_against_one_hot_labels(tiny):
    spec = dataclasses.replace(model.MLPSpec((784, 10), init="glorot"), label_smoothing=0.3)
    params = model.init(jax.random.PRNGKey(0), spec)
    images, labels = jnp.asarray(tiny.validation.images), jnp.asarray(tiny.validation.labels)
    loss, *_ = train.make_evaluate(spec, jnp.float32)(params, images, labels, model.eval_state(spec, None))
    z = model.logits(params, model.inputs(images, spec), spec)
    plain = losses.cost_from_logits(z, losses.one_hot(labels, 10, z.dtype), spec)
    np.testing.assert_allclose(float(loss), float(plain), rtol=1e-5)


# --- the moving average of the parameters -------------------------------------------------------------


def test_ema_update_is_the_debiased_weighted_average():
    decay, values = 0.9, [jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0]), jnp.array([0.0, 5.0])]
    ema = {"params": jnp.array([100.0, 100.0]), "model_state": []}  # the initial values weigh nothing
    for step, value in enumerate(values, start=1):
        ema = train.ema_update(ema, value, [], decay, jnp.int32(step))
        weights = decay ** np.arange(step - 1, -1, -1)
        expected = (weights[:, None] * np.stack(values[:step])).sum(0) / weights.sum()
        np.testing.assert_allclose(ema["params"], expected, rtol=1e-5)


EMA_NET = dict(layers="dense:16,batchnorm,relu,dropout:0.25,dense:10", init="he", optimizer="momentum",
                learning_rate=0.05, batch_size=20, epochs=2, augment_shift=1, augment_elastic_alpha=8.0, ema_decay=0.9)


def test_ema_and_elastic_distortions_are_kept_evaluated_and_resumed_bit_identically(tiny, tmp_path):
    config = Config(**EMA_NET, steps_per_call=7)
    recorder = Recorder()
    plan, uninterrupted = fit(config, tiny, hooks=[recorder])
    ema = uninterrupted.state.ema
    assert set(ema) == {"params", "model_state"}
    assert not np.allclose(ema["params"][0]["w"], uninterrupted.state.params[0]["w"])
    assert not np.allclose(ema["model_state"][1]["mean"], uninterrupted.state.model_state[1]["mean"])
    # Evaluation uses the averages: the last record is their validation accuracy.
    found = train.Evaluator(plan.spec, plan.dtype, False)(ema["params"], *train.device_splits(tiny)["validation"],
                                                          ema["model_state"])
    assert recorder.records[-1]["validation_accuracy"] == pytest.approx(float(found[1]))
    with pytest.raises(Recorder.Stop):
        fit(config, tiny, hooks=[Recorder(stop_at=14, directory=tmp_path)])  # mid-epoch
    restored, _ = checkpoint.restore(tmp_path, plan.init_state())
    _, resumed = fit(config, tiny, state=restored)
    chex.assert_trees_all_equal(resumed.state, uninterrupted.state)


# train.TrainState before --ema_decay: its fields but the last.
_TrainStateWithoutEma = collections.namedtuple("TrainStateWithoutEma", train.TrainState._fields[:-1])


def test_a_checkpoint_from_before_the_ema_field_restores(tiny, tmp_path):
    plan = train.Plan.create(Config(**TINY), tiny)
    state = plan.init_state()
    checkpoint.save(tmp_path, 0, _TrainStateWithoutEma(*state[:6]))
    restored, _ = checkpoint.restore(tmp_path, state)
    assert restored.ema == () and isinstance(restored, train.TrainState)
    chex.assert_trees_all_equal(restored.params, state.params)


# --- best validation and the target -----------------------------------------------------------------


def test_best_validation_tracks_each_model_on_its_own():
    state = {"w": jnp.zeros((2, 3)), "step": jnp.zeros((2,), jnp.int32)}
    best = train.BestValidation(2)
    assert best.update(10, jax.tree.map(lambda x: x + 1, state), [0.5, np.nan])
    assert best.step.tolist() == [10, -1]
    assert best.update(20, jax.tree.map(lambda x: x + 2, state), [0.4, 0.3])
    assert best.step.tolist() == [10, 20] and best.accuracy.tolist() == [0.5, 0.3]
    np.testing.assert_array_equal(best.state["w"], [[1, 1, 1], [2, 2, 2]])
    assert not best.update(30, jax.tree.map(lambda x: x + 3, state), [0.5, 0.3])  # ties keep the earliest
    assert not best.changed


def test_fit_keeps_the_best_state_and_stops_at_the_target(tiny):
    recorder, best = Recorder(), train.BestValidation(1)
    config = Config(**{**TINY, "epochs": 4}, eval_every=5)
    plan, _ = fit(config, tiny, hooks=[recorder], best=best)
    accuracies = [r["validation_accuracy"] for r in recorder.records]
    assert best.step[0] == recorder.records[int(np.argmax(accuracies))]["step"]
    assert int(best.state.step) == best.step[0]
    found = train.Evaluator(plan.spec, plan.dtype, False)(best.state.params, *train.device_splits(tiny)["validation"])
    assert float(found[1]) == pytest.approx(max(accuracies))
    target = float(np.round(np.median(accuracies), 3))  # reached in the run, not at its first evaluation
    first = next(r["step"] for r in recorder.records if r["validation_accuracy"] >= target)
    stopped = Recorder()
    _, result = fit(dataclasses.replace(config, target_accuracy=target), tiny, hooks=[stopped])
    assert result.target["step"] == first == int(result.state.step) == stopped.records[-1]["step"] < plan.total_steps
    assert all(r["validation_accuracy"] < target for r in stopped.records[:-1])


def test_config_refuses_selection_and_target_without_a_validation_split():
    with pytest.raises(ValueError, match="target_accuracy needs a validation split"):
        Config(target_accuracy=0.9, validation_size=0)
    with pytest.raises(ValueError, match="select needs a validation split"):
        Config(select="best_validation", validation_size=0)


CLI = dict(TINY, train_examples=400, validation_size=300, eval_every=10, epochs=3, checkpoint_every=10)


def _run(config, workdir, capsys):
    summary = experiment.run_train(config, workdir)
    return summary, capsys.readouterr().out


def test_the_result_is_printed_before_the_figures_are_drawn(tmp_path, cache_dir, capsys, monkeypatch):
    drawn = experiment._plot_run

    def slow_figures(*args):
        print("DRAWING THE FIGURES")
        time.sleep(0.3)
        drawn(*args)

    monkeypatch.setattr(experiment, "_plot_run", slow_figures)
    summary, out = _run(Config(**CLI, cache_dir=str(cache_dir), target_accuracy=0.3), tmp_path / "w", capsys)
    assert out.index("Test accuracy") < out.index("Target:") < out.index("DRAWING THE FIGURES") < out.index("Wall time")
    timings, part = summary["timings"], summary["parts"][-1]  # the figures still count in the wall time
    assert timings["plot_s"] >= 0.3 and timings["peak_rss_bytes"] == part["peak_rss_bytes"] > 0
    assert timings["total_s"] == part["total_s"] >= part["result_s"] + timings["plot_s"]
    assert summary["target"]["reached"] and summary["target"]["total_s"] == part["result_s"]  # the time to the result
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["timings"] == json.loads(json.dumps(timings))


def test_the_final_checkpoint_follows_the_result_and_a_signal_then_stops_the_run(tmp_path, cache_dir, capsys,
                                                                                  monkeypatch):
    saved, evaluate_final = checkpoint.save, train.FitResult.final_splits

    def announced_save(*args, **kwargs):
        print("SAVING THE CHECKPOINT")
        return saved(*args, **kwargs)

    def interrupted_evaluation(self, *args):  # Ctrl-C after the last chunk, before any checkpoint
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate_final(self, *args)

    monkeypatch.setattr(checkpoint, "save", announced_save)
    monkeypatch.setattr(train.FitResult, "final_splits", interrupted_evaluation)
    workdir, config = tmp_path / "w", Config(**{**CLI, "checkpoint_every": 0, "epochs": 1}, cache_dir=str(cache_dir))
    with pytest.raises(experiment.Interrupted, match="after the last step"):
        experiment.run_train(config, workdir)
    out = capsys.readouterr().out
    assert out.count("SAVING THE CHECKPOINT") == 1 and out.index("Test accuracy") < out.index("SAVING THE CHECKPOINT")
    assert checkpoint.latest_step(workdir / experiment.CHECKPOINT_DIR) == 20
    assert not (workdir / experiment.SUMMARY_FILE).exists()
    monkeypatch.setattr(train.FitResult, "final_splits", evaluate_final)
    summary, out = _run(config, workdir, capsys)  # the same command finishes it, training nothing more
    assert summary["parts"][-1]["start_step"] == summary["parts"][-1]["end_step"] == 20
    assert "Wall time" in out and "SAVING THE CHECKPOINT" not in out


def failing_evaluation(self, *args):
    raise MemoryError("out of memory in the final evaluation")


def test_a_failing_final_evaluation_still_leaves_the_final_checkpoint(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(train.FitResult, "final_splits", failing_evaluation)
    workdir = tmp_path / "w"
    with pytest.raises(MemoryError):
        experiment.run_train(Config(**{**CLI, "checkpoint_every": 0, "epochs": 1}, cache_dir=str(cache_dir)), workdir)
    assert checkpoint.latest_step(workdir / experiment.CHECKPOINT_DIR) == 20


def test_best_validation_run_resumes_and_reports_both_models(tmp_path, cache_dir, capsys):
    config = Config(**CLI, cache_dir=str(cache_dir), select="best_validation", num_seeds=2, ema_decay=0.5)
    whole, out = _run(config, tmp_path / "whole", capsys)
    best = whole["best_validation"]
    assert len(best["step"]) == 2 and 0 < min(best["step"]) and "test_accuracy" in best
    assert best["validation_accuracy"] >= whole["final"]["validation_accuracy"] - 1e-9
    assert "Best validation:" in out and "Wall time" in out and "peak memory" in out
    assert whole["timings"]["peak_rss_bytes"] > 0 and whole["parts"][0]["peak_rss_bytes"] > 0
    # The same run in two parts (a constant schedule may be extended): the same best states.
    _run(dataclasses.replace(config, epochs=1), tmp_path / "parts", capsys)
    parts, _ = _run(config, tmp_path / "parts", capsys)
    assert len(parts["parts"]) == 2
    assert parts["best_validation"] == best and parts["final"] == whole["final"]
    plan = experiment.make_plan(config, experiment.load_dataset(config))
    saved = [checkpoint.restore(d / experiment.BEST_DIR, plan.init_state())[0] for d in (tmp_path / "whole",
                                                                                         tmp_path / "parts")]
    chex.assert_trees_all_equal(*saved)
    trained = experiment.load_trained(tmp_path / "parts", model_index=1)  # eval, predict, serve: the best, averaged
    assert trained.step == best["step"][1]
    chex.assert_trees_all_equal(trained.params, jax.tree.map(lambda x: x[1], saved[0].ema["params"]))
    _check_the_ensemble(tmp_path / "whole", whole, out, capsys)


def _check_the_ensemble(workdir, summary, out, capsys):
    """The 2-model run's ensemble, recomputed here from each model alone: summary, eval and predict."""
    assert summary["ensemble"]["models"] == 2 and "Ensemble:" in out and "their ensemble" in out
    models = [experiment.load_trained(workdir, model_index=i) for i in (0, 1)]
    test = models[0].dataset.test
    spec = models[0].plan.spec
    probabilities = [np.asarray(model.apply(m.params, model.inputs(jnp.asarray(test.images), spec), spec,
                                            m.model_state)) for m in models]
    mean = (probabilities[0] + probabilities[1]) / 2
    expected = float(np.mean(np.argmax(mean, axis=1) == test.labels))
    assert summary["best_validation"]["ensemble"]["test_accuracy"] == pytest.approx(expected, abs=1e-9)
    evaluated = experiment.run_eval(workdir, model_index=experiment.ENSEMBLE)
    assert evaluated["test"]["accuracy"] == pytest.approx(expected, abs=1e-9)
    alone = [float(np.mean(np.argmax(p, axis=1) == test.labels)) for p in probabilities]
    assert evaluated["test"]["models"]["values"] == pytest.approx(alone, abs=1e-6)  # float32 means
    image = workdir / "digit.png"
    Image.fromarray(255 - test.images[0]).save(image)  # black on white, as a user draws it
    predicted, failures = experiment.run_predict(workdir, str(image), False, model_index=experiment.ENSEMBLE)
    drawn = jnp.asarray(predict.preprocess_file(image)[None])
    by_hand = np.mean([np.asarray(model.apply(m.params, model.inputs(drawn, spec), spec, m.model_state))[0]
                       for m in models], axis=0)
    assert failures == 0 and "the ensemble of its 2 models" in capsys.readouterr().out
    found = predicted["predictions"][0]
    assert found["prediction"] == int(np.argmax(by_hand))
    assert found["probability"] == pytest.approx(float(np.max(by_hand)), rel=1e-5)


def test_the_ensemble_averages_probabilities_and_leaves_out_diverged_models():
    labels = np.array([1, 0])
    probabilities = np.array([[[0.6, 0.4], [0.9, 0.1]],   # right on example 1 only
                              [[0.0, 1.0], [0.45, 0.55]],  # right on example 0 only
                              [[np.nan, np.nan], [np.nan, np.nan]]])  # diverged
    assert train.ensemble_accuracy(probabilities, labels, keep=[True, True, False]) == 1.0  # means .3/.7, .675/.325
    assert train.ensemble_accuracy(probabilities, labels, keep=[True, False, False]) == 0.5
    assert np.isnan(train.ensemble_accuracy(probabilities, labels, keep=[False, False, False]))


def test_target_accuracy_is_recorded_and_a_run_stopped_there_is_finished(tmp_path, cache_dir, capsys):
    config = Config(**CLI, cache_dir=str(cache_dir), target_accuracy=0.6)
    summary, out = _run(config, tmp_path, capsys)
    target = summary["target"]
    assert target["reached"] and target["step"] == summary["steps"] < 60 and target["validation_accuracy"] >= 0.6
    assert target["train_s"] == summary["timings"]["train_s"] and "Target:" in out
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == target["step"] and all(m["validation_accuracy"] < 0.6 for m in metrics[:-1])
    again, out = _run(config, tmp_path, capsys)
    assert "holds a finished run" in out and again["steps"] == summary["steps"] and again["target"] == target
    unreachable, _ = _run(dataclasses.replace(config, target_accuracy=0.999), tmp_path, capsys)
    assert unreachable["steps"] == 60 and unreachable["target"] == {"accuracy": 0.999, "reached": False}


def test_the_wall_time_line_names_what_each_version_timed():
    """Runs of earlier versions lack data_s and gradcheck_s, or plot_s (their total_s then stopped
    before the plots): "other" is what the run's total_s holds besides what was timed."""
    base = {"train_s": 10.0, "eval_s": 2.0, "compile_s": 1.0, "eval_compile_s": 0.5, "total_s": 20.0}
    oldest = experiment.wall_time_line(base)
    older = experiment.wall_time_line({**base, "data_s": 0.5, "gradcheck_s": 1.5})
    now = experiment.wall_time_line({**base, "data_s": 0.5, "gradcheck_s": 1.5, "plot_s": 2.0,
                                     "peak_rss_bytes": 2**30})
    assert oldest.startswith("Wall time 20.00 s: training 10.00 s, evaluation 2.00 s, compilation 1.50 s")
    assert oldest.endswith("other 6.50 s (data, gradient check at init, checkpoints)")
    assert older.endswith("data 0.50 s, gradient check at init 1.50 s, other 4.50 s (initialisation, checkpoints)")
    assert now.endswith("plots 2.00 s, other 2.50 s (initialisation, checkpoints); peak memory 1.00 GiB")
