"""Tests for digits.serve (--mode=serve): the saliency maths, the JSON API and its errors, loading,
packaging, and the page itself in a headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium; `.ci/run` installs them, and sets DIGITS_REQUIRE_BROWSER=1 so that CI never
skips that test)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw

from cli import ENV, ROOT, run_cli
from digits import checkpoint, experiment, model, predict, report, serve
from digits.config import Config

SEVEN = [(90, 60), (190, 60), (120, 230)]  # on a 280 x 280 canvas


def drawing_png(strokes=(SEVEN,), size=280, width=22) -> bytes:
    """Black ink on white, as the page's canvas sends it."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for stroke in strokes:
        draw.line(stroke, fill="black", width=width, joint="curve")
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def make_run(workdir: pathlib.Path, cache_dir, **options) -> pathlib.Path:
    """A workdir as training leaves it (config.json, an Orbax checkpoint), written by the library
    at the initial params: serving does not care how good the models are, and training would
    cost ~10 s more."""
    config = Config(train_examples=1000, validation_size=1000, init="glorot", cache_dir=str(cache_dir), **options)
    plan = experiment.make_plan(config, experiment.load_dataset(config))
    workdir.mkdir(parents=True)
    report.write_json(workdir / experiment.CONFIG_FILE, {"config": config.to_dict()})
    checkpoint.save(workdir / experiment.CHECKPOINT_DIR, 0, plan.init_state(),
                    {"fingerprint": config.training_fingerprint()}, 1)
    return workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """An ensemble of two seeds of a small MLP."""
    return make_run(tmp_path_factory.mktemp("serve") / "run", cache_dir, layer_sizes=(784, 16, 10), num_seeds=2)


@pytest.fixture(scope="module")
def analyser(trained):
    return serve.load(trained)  # the run's config names the test's data cache


@pytest.fixture(scope="module")
def server(analyser):
    """The HTTP server on a free port, in a thread: (host, port)."""
    server = serve.make_server(analyser, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[:2]
    server.shutdown()
    server.server_close()


def request(address, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON or raw bytes) of one request on a fresh connection."""
    connection = http.client.HTTPConnection(*address, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    return response.status, response, json.loads(data) if is_json else data


def raw_request(address, data: bytes) -> tuple[int, dict]:
    """Sends bytes as they are (malformed requests http.client would refuse to write); reads
    until the server closes the connection."""
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# --- the maths ------------------------------------------------------------------------------------


def random_image(seed: int) -> np.ndarray:
    """A uint8 (28, 28) image with ink everywhere (no relu sits exactly at a kink)."""
    return np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)


MODELS = {  # softmax MLPs are the served run of the API tests
    "mlp_sigmoid_output": dict(layers="dense:12,dense:7,dense:10", activation="tanh", output="sigmoid",
                               cost="quadratic"),
    "conv_batchnorm": dict(layers="conv3x3:3:s2,batchnorm,maxpool2,dense:10"),
}


@pytest.mark.parametrize("kind, models", [("mlp_sigmoid_output", 2), ("conv_batchnorm", 1)])
def test_saliency_by_hand_equals_jax_grad_and_the_slope_of_the_shown_probability(kind, models):
    """The hand-derived d p_c / d x agrees with jax.grad to float64 rounding, and both are the
    slope of the probability the page shows (the ensemble mean of the models' probabilities,
    sigmoid outputs normalised), checked by a central difference along a random direction."""
    with jax.enable_x64(True):
        spec = model.spec_from_text(MODELS[kind]["layers"], (28, 28), init="glorot",
                                    **{k: v for k, v in MODELS[kind].items() if k != "layers"})
        per_model = [model.init(jax.random.PRNGKey(seed), spec, jnp.float64) for seed in range(models)]
        # Running statistics unlike a batch's, so that evaluation mode is what gets checked.
        states = [jax.tree.map(lambda v: jnp.abs(v + 0.3 * jax.random.normal(jax.random.PRNGKey(9), v.shape, v.dtype))
                               + 0.1, model.init_state(spec, jnp.float64)) for _ in range(models)]
        stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)  # noqa: E731
        analyser = serve.Analyser(stack(per_model), stack(states), spec, jnp.float64, True, {})
        image = random_image(models)
        found = analyser.analyse_image(image)

        @jax.jit
        def shown(x):  # the ensemble's shown probabilities, written independently of serve.py
            outputs = [model.apply(p, x, spec, s)[0] for p, s in zip(per_model, states, strict=True)]
            if spec.output == "sigmoid":
                outputs = [a / a.sum() for a in outputs]
            return sum(outputs) / models

        x = model.inputs(jnp.asarray(image[None]), spec, jnp.float64)
        probabilities = shown(x)
        np.testing.assert_allclose(found["probabilities"], probabilities, rtol=1e-12)
        assert found["digit"] == int(jnp.argmax(probabilities))
        assert np.isclose(sum(found["probabilities"]), 1.0)
        np.testing.assert_allclose(found["input"], image / 255.0, rtol=1e-15)

        manual, autodiff = np.array(found["saliency_manual"]), np.array(found["saliency_autodiff"])
        assert manual.shape == autodiff.shape == (28, 28)
        scale = np.abs(autodiff).max()
        assert scale > 0
        assert found["max_abs_difference"] == np.abs(manual - autodiff).max() <= 1e-12 * scale
        direction = np.random.default_rng(0).normal(size=(28, 28))
        h = 1e-5
        step = jnp.asarray(direction.reshape(x.shape)) * h
        slope = (shown(x + step)[found["digit"]] - shown(x - step)[found["digit"]]) / (2 * h)
        np.testing.assert_allclose(float(slope), float(np.sum(manual * direction)), rtol=1e-6,
                                   atol=1e-9 * scale * np.abs(direction).sum())


def test_probability_cotangent_is_the_jacobian_row_of_the_shown_probability():
    z = jnp.array([[0.3, -1.2, 2.0, 0.1]], jnp.float32)
    for output in ("softmax", "sigmoid"):
        def shown(z, output=output):
            return serve.shown_probabilities(model.activate(z, output), output)

        jacobian = jax.jacobian(shown)(z)[0, :, 0]
        for c in range(4):
            np.testing.assert_allclose(serve.probability_cotangent(model.activate(z, output), jnp.int32(c), output)[0],
                                       jacobian[c], rtol=1e-5, atol=1e-7)


# --- loading ------------------------------------------------------------------------------------


def test_load_gives_every_model_and_compiles_once(analyser, trained):
    assert jax.tree.leaves(analyser.params)[0].shape[0] == 2
    assert analyser.info["models"] == 2 and analyser.info["network"] == "784-16-10"
    for seed in range(3):
        analyser.analyse(drawing_png([SEVEN[: 2 + seed % 2], [(40 + 20 * seed, 200), (240, 250)]]))
    assert analyser.compiled._cache_size() == 1


def test_a_run_of_one_batch_norm_model_serves_its_running_statistics(tmp_path, cache_dir):
    workdir = make_run(tmp_path / "bn", cache_dir, layers="conv3x3:4,batchnorm,maxpool2,dense:10")
    found = serve.load(workdir).analyse(drawing_png())
    trained = experiment.load_trained(workdir)
    (tmp_path / "seven.png").write_bytes(drawing_png())
    x = model.inputs(jnp.asarray(predict.preprocess_file(tmp_path / "seven.png")[None]), trained.plan.spec)
    expected = model.apply(trained.params, x, trained.plan.spec, trained.model_state)[0]
    np.testing.assert_allclose(found["probabilities"], expected, rtol=1e-5, atol=1e-7)
    assert found["max_abs_difference"] <= 1e-4 * np.abs(found["saliency_autodiff"]).max()


@pytest.mark.parametrize("damage, message", [
    ("missing", "copy"),  # the workdir is named (its wording is the CLI's business)
    ("no_checkpoint", "no checkpoint"),
    ("corrupt", "corrupt or truncated"),
])
def test_a_run_that_cannot_be_served_is_a_one_line_usage_error(trained, tmp_path, damage, message):
    copy = tmp_path / "copy"
    if damage != "missing":
        shutil.copytree(trained, copy)
    if damage == "no_checkpoint":
        shutil.rmtree(copy / "checkpoints")
    if damage == "corrupt":
        biggest = max((p for p in (copy / "checkpoints").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[:100])
    with pytest.raises(experiment.UsageError, match=message) as error:
        serve.load(copy)
    assert "\n" not in str(error.value)


def test_serve_mode_errors_are_one_line_before_the_server_starts(trained, cache_dir, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    result = run_cli("--mode=serve", f"--workdir={tmp_path / 'run'}", "--port=0", cache_dir=cache_dir, check=False,
                     timeout=120)
    assert result.returncode in (1, 2) and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and "no checkpoint" in result.stderr and "Serving" not in result.stdout
    result = run_cli("--mode=serve", cache_dir=cache_dir, check=False, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: --mode=serve needs --workdir"), result.stderr
    assert result.stderr.count("\n") == 1


# --- the API --------------------------------------------------------------------------------------


def test_api_answers_a_png_with_the_preprocessing_of_predict_mode(server, analyser, tmp_path):
    png = drawing_png()
    status, response, found = request(server, "POST", serve.PREDICT_PATH, png, {"Content-Type": "image/png"})
    assert status == 200, found
    assert set(found) == {"digit", "probabilities", "input", "saliency_manual", "saliency_autodiff",
                          "max_abs_difference"}
    (tmp_path / "seven.png").write_bytes(png)
    np.testing.assert_allclose(found["input"], predict.preprocess_file(tmp_path / "seven.png") / 255.0, rtol=1e-6)
    probabilities = np.array(found["probabilities"])
    assert probabilities.shape == (10,) and abs(probabilities.sum() - 1) < 1e-5
    assert found["digit"] == int(probabilities.argmax())
    manual, autodiff = np.array(found["saliency_manual"]), np.array(found["saliency_autodiff"])
    assert manual.shape == autodiff.shape == (28, 28)
    assert found["max_abs_difference"] == pytest.approx(np.abs(manual - autodiff).max(), abs=0)
    assert found["max_abs_difference"] <= 1e-4 * np.abs(autodiff).max()  # float32 rounding only
    status, _, again = request(server, "POST", serve.PREDICT_PATH, png)
    assert again == found  # one compiled program, deterministic
    status, _, info = request(server, "GET", serve.MODEL_PATH)
    assert status == 200 and info["models"] == 2 and info["classes"] == 10


def tiny_png_of_huge_size(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels (the data is not needed to refuse it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD_REQUESTS = [
    ("POST", "/api/predict", b"hello, not an image", {}, 400, "not a usable image: not an image file"),
    ("POST", "/api/predict", b"", {}, 400, "empty request body"),
    ("POST", "/api/predict", drawing_png()[:120], {}, 400, "not a usable image: truncated or corrupt"),
    ("POST", "/api/predict", drawing_png(strokes=()), {}, 400, "no ink found"),
    ("POST", "/api/predict", b"\0" * (serve.MAX_BODY_BYTES + 1), {}, 413, "request body too large"),
    ("POST", "/api/predict", tiny_png_of_huge_size(5000, 5000), {}, 413, "image too large (5000 x 5000 pixels"),
    ("GET", "/nope", None, {}, 404, "no such path: /nope"),
    ("POST", "/api/nope", b"x", {}, 404, "no such path: /api/nope"),
    ("GET", "/api/predict", None, {}, 405, "GET /api/predict is not allowed (use POST)"),
    ("POST", "/", drawing_png(), {}, 405, "POST / is not allowed (use GET)"),
    ("PUT", "/api/predict", b"x", {}, 405, "method PUT is not allowed"),
    ("DELETE", "/", None, {}, 405, "method DELETE is not allowed"),
    ("POST", "/api/predict", b"x", {"Content-Length": "abc"}, 400, "bad Content-Length"),
]


def test_bad_requests_are_one_line_json_errors_and_the_server_keeps_serving(server):
    good = drawing_png()
    for method, path, body, headers, status, message in BAD_REQUESTS:
        found_status, response, found = request(server, method, path, body, headers)
        assert (found_status, list(found)) == (status, ["error"]), (method, path, found)
        assert message in found["error"] and "\n" not in found["error"], found
        if status == 405 and method in ("GET", "POST"):
            assert response.getheader("Allow") in ("GET", "POST")
        assert request(server, "POST", serve.PREDICT_PATH, good)[0] == 200
    # What http.client will not send: no Content-Length, a malformed request line.
    status, found = raw_request(server, b"POST /api/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 411 and "Content-Length" in found["error"]
    status, found = raw_request(server, b"GET / two-words HTTP/1.1\r\n\r\n")
    assert status == 400 and list(found) == ["error"]
    assert request(server, "POST", serve.PREDICT_PATH, good)[0] == 200


def test_the_page_and_its_assets_ship_in_the_package_and_name_nothing_remote(server):
    for path, (name, content_type) in serve.ASSETS.items():
        status, response, body = request(server, "GET", path)
        assert status == 200 and response.getheader("Content-Type") == content_type
        assert body == (ROOT / "digits" / "static" / name).read_bytes()
        assert not re.search(rb"https?://|(src|href)=[\"']//|url\(", body), name


def test_an_install_gets_the_page_and_the_digits_command(monkeypatch):
    """What setuptools' build_py puts in a wheel (a non-editable install), from setup.cfg: the
    page's files and run_experiment.py, and the `digits` console script (offline, no build)."""
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    dist = Distribution()
    dist.parse_config_files()
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    shipped = {f"{package}/{name}" for package, _, _, names in build_py.data_files for name in names}
    assert {f"digits/static/{name}" for name, _ in serve.ASSETS.values()} <= shipped
    assert dist.py_modules == ["run_experiment"]
    assert dist.entry_points["console_scripts"] == ["digits = run_experiment:console_main"]


# --- the page in a real browser ---------------------------------------------------------------------


def browser_or_skip():
    """(chromium, chromedriver) paths; skips when absent, unless DIGITS_REQUIRE_BROWSER is set (CI)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = None
    if not (chromium and driver):
        message = "needs chromium, chromium-driver (apt) and selenium (pip install -e '.[test]')"
        if os.environ.get("DIGITS_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


def start_server(workdir, cache_dir, stderr):
    """run_experiment.py --mode=serve on a free port: (process, url, queue of its stdout lines)."""
    process = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), "--mode=serve", f"--workdir={workdir}",
                                "--port=0", f"--cache_dir={cache_dir}"], stdout=subprocess.PIPE, stderr=stderr,
                               text=True, env=ENV, cwd=ROOT)
    lines = queue.Queue()
    reader = lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)]  # noqa: E731
    threading.Thread(target=reader, daemon=True).start()
    while True:
        line = lines.get(timeout=120)
        assert line is not None, "the server exited before serving"
        if found := re.search(r"Serving the drawing page at (http://\S+/)", line):
            return process, found.group(1), lines


def open_browser(chromium: str, driver_path: str):
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for drivers on the internet
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,960",
                     "--disable-gpu", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


def draw(driver, pad, strokes, pointer: str):
    """Strokes of (u, v) points in [0, 1]^2 of the canvas, with the mouse or a finger."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    kind = interaction.POINTER_TOUCH if pointer == "touch" else interaction.POINTER_MOUSE
    actions = ActionBuilder(driver, mouse=PointerInput(kind, pointer), duration=5)
    width, height = pad.size["width"], pad.size["height"]
    at = lambda u, v: (round((u - 0.5) * width), round((v - 0.5) * height))  # noqa: E731  offsets from the centre
    for stroke in strokes:
        actions.pointer_action.move_to(pad, *at(*stroke[0])).pointer_down()
        for u, v in stroke[1:]:
            actions.pointer_action.move_to(pad, *at(u, v))
        actions.pointer_action.pointer_up()
    actions.perform()


def three():
    """A "3": two bowls, as a hand draws it in one stroke."""
    upper = [(0.5 + 0.19 * np.cos(t), 0.33 + 0.15 * np.sin(t)) for t in np.linspace(-2.6, 1.57, 14)]
    lower = [(0.5 + 0.21 * np.cos(t), 0.64 + 0.17 * np.sin(t)) for t in np.linspace(-1.57, 2.7, 16)]
    return [upper + lower]


SHOWN = """
const rows = [...document.querySelectorAll('#probabilities li')];
const pixels = (id) => { const c = document.getElementById(id);
  return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); };
return {state: document.body.dataset.state, digit: document.getElementById('digit').textContent,
        probabilities: rows.map(r => Number(r.dataset.probability)),
        texts: rows.map(r => r.querySelector('.value').textContent),
        predicted: rows.filter(r => r.classList.contains('predicted')).map(r => Number(r.dataset.class)),
        input: pixels('input'), manual: pixels('saliency-manual'), autodiff: pixels('saliency-autodiff'),
        difference: Number(document.getElementById('difference').dataset.value),
        png: document.getElementById('pad').toDataURL('image/png'),
        resources: performance.getEntriesByType('resource').map(e => e.name),
        model: document.getElementById('model').textContent};
"""


def diverging(values: np.ndarray, scale: float) -> np.ndarray:
    """The page's colour map (app.js), RGBA (H, W, 4): red for positive, blue for negative."""
    t = np.round(255 * np.minimum(np.abs(values), scale) / scale)
    rgb = np.where((values >= 0)[..., None], np.stack([255 + 0 * t, 255 - t, 255 - t], -1),
                   np.stack([255 - t, 255 - t, 255 + 0 * t], -1))
    return np.concatenate([rgb, np.full(values.shape + (1,), 255)], -1)


def wait_and_compare_with_the_api(driver, url) -> dict:
    """Waits for the page's answer to the drawing, then asks the API about the very same PNG and
    checks that the page shows exactly that."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda d: d.execute_script(
        "return document.body.dataset.state") in ("ready", "error"))
    shown = driver.execute_script(SHOWN)
    assert shown["state"] == "ready", driver.find_element("id", "status").text
    png = base64.b64decode(shown["png"].split(",", 1)[1])
    status, _, api = request(re.match(r"http://([\d.]+):(\d+)/", url).groups(), "POST", serve.PREDICT_PATH, png)
    assert status == 200, api
    assert shown["digit"] == str(api["digit"]) and shown["predicted"] == [api["digit"]]
    assert shown["probabilities"] == api["probabilities"]
    assert shown["texts"] == [f"{100 * p:.1f}%" for p in api["probabilities"]]
    assert shown["difference"] == api["max_abs_difference"]
    seen = np.round(255 * np.array(api["input"])).astype(int)
    np.testing.assert_array_equal(np.array(shown["input"]).reshape(28, 28, 4)[..., 0], seen)
    manual, autodiff = np.array(api["saliency_manual"]), np.array(api["saliency_autodiff"])
    scale = max(np.abs(manual).max(), np.abs(autodiff).max())
    for name, values in (("manual", manual), ("autodiff", autodiff)):
        np.testing.assert_allclose(np.array(shown[name]).reshape(28, 28, 4), diverging(values, scale), atol=1)
    return {**shown, "api": api}


def test_the_page_in_headless_chromium_shows_what_the_api_returns(trained, cache_dir, tmp_path):
    """Draws on the canvas with the mouse, then (after Clear) with a finger; each time the page
    must show what POST /api/predict returns for the canvas's PNG. Nothing is fetched from
    elsewhere, the console has no errors, and Ctrl-C stops the server cleanly.

    DIGITS_SERVE_WORKDIR=RUN serves RUN instead of the tiny run; DIGITS_SERVE_SCREENSHOT=FILE
    saves the page with its "3" (docs/serve.png comes from these two)."""
    chromium, driver_path = browser_or_skip()
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process, url, lines = start_server(os.environ.get("DIGITS_SERVE_WORKDIR", trained), cache_dir, stderr)
    driver = None
    try:
        driver = open_browser(chromium, driver_path)
        driver.get(url)
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, 20).until(lambda d: " from " in d.find_element("id", "model").text)
        assert driver.execute_script("return document.body.dataset.state") == "empty"
        pad = driver.find_element("id", "pad")

        draw(driver, pad, three(), "mouse")
        shown = wait_and_compare_with_the_api(driver, url)
        if os.environ.get("DIGITS_SERVE_WORKDIR") is None:
            assert "ensemble of 2 models" in shown["model"]
        if screenshot := os.environ.get("DIGITS_SERVE_SCREENSHOT"):
            driver.save_screenshot(screenshot)

        driver.find_element("id", "clear").click()
        cleared = driver.execute_script(SHOWN)
        assert cleared["state"] == "empty" and cleared["digit"] == "\u2013" and not any(cleared["probabilities"])
        draw(driver, pad, [[(0.5, 0.15), (0.52, 0.5), (0.53, 0.85)], [(0.38, 0.3), (0.5, 0.15)]], "touch")
        touched = wait_and_compare_with_the_api(driver, url)
        assert touched["png"] != shown["png"]

        origin = url.rstrip("/")
        assert touched["resources"] and all(name.startswith(origin) for name in touched["resources"])
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        if driver is not None:
            driver.quit()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    stderr = log.read_text()
    assert process.returncode == 0, stderr
    rest = []
    while (line := lines.get(timeout=10)) is not None:
        rest.append(line)
    assert rest[-1] == "Stopped serving\n" and "Traceback" not in stderr, (rest, stderr)
