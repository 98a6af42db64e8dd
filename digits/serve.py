"""The drawing page: a local web server that classifies a digit drawn with the mouse or a finger.

    python run_experiment.py --mode=serve --workdir=RUN [--port=8000] [--host=127.0.0.1]

`GET /` is the page (HTML, JavaScript and CSS from `digits/static/`, shipped in the package:
nothing is fetched from the internet). `POST /api/predict` takes an image body (the page sends
its canvas as PNG) and returns JSON:

    {"digit": c, "probabilities": [C floats], "input": 28 rows of 28 floats in [0, 1],
     "saliency_manual": 28 x 28, "saliency_autodiff": 28 x 28, "max_abs_difference": float}

`input` is what the model sees: the image prepared by `predict.preprocess_file`, exactly as
`--mode=predict` prepares a file. `probabilities` are those `--mode=predict` shows (sigmoid
outputs normalised to sum to one), averaged over the models when the run trained several (an
ensemble of seeds, or of a learning-rate sweep). The saliency is d p_c / d x, the derivative of
the shown probability of the predicted class c with respect to each input pixel, computed twice:
by the hand-derived backward pass (`backprop.input_gradient` with the logits cotangent
d p_c / d z written out in `probability_cotangent`) and by `jax.grad`; `max_abs_difference` is
their largest difference. `GET /api/model` describes the model.

A bad request (a body that is not an image, or too large, an unknown path, a wrong method) is a
4xx JSON `{"error": "<one line>"}` and the server keeps serving. The prediction is compiled once,
before the server starts; Ctrl-C stops it.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import importlib.resources
import io
import json
import pathlib
import signal
import socket
import sys
import tempfile
import time
import urllib.parse

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from digits import backprop, compiling, experiment, model, predict, train

MAX_BODY_BYTES = 4 * 2**20  # a 280 x 280 drawing is ~10 KB; photos through the API fit too
MAX_PIXELS = 4096 * 4096  # decoding a tiny PNG of huge dimensions would take seconds and memory
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
PREDICT_PATH, MODEL_PATH = "/api/predict", "/api/model"
ALLOWED = {**{path: "GET" for path in ASSETS}, MODEL_PATH: "GET", PREDICT_PATH: "POST"}


class RequestError(Exception):
    """A bad request: answered with `status` and a one-line JSON error; the server goes on."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- the numbers the page shows ---------------------------------------------------------------


def shown_probabilities(outputs: jax.Array, output: str) -> jax.Array:
    """Output activations (B, C) -> the probabilities shown (B, C): softmax as is, sigmoid
    outputs normalised to sum to one (as `--mode=predict` shows them)."""
    return outputs / outputs.sum(axis=-1, keepdims=True) if output == "sigmoid" else outputs


def probability_cotangent(outputs: jax.Array, c: jax.Array, output: str) -> jax.Array:
    """d q_c / d z (B, C): the derivative of the shown probability q_c of class c with respect to
    the logits z, from the output activations a = f(z) (B, C).

        softmax, q = a:            d q_c / d z_j = q_c (e_c - q)_j
        sigmoid, q = a / sum(a):   d q_c / d z_j = q_c (e_c - q)_j (1 - a_j)
    """
    q = shown_probabilities(outputs, output)
    e_c = jax.nn.one_hot(c, q.shape[-1], dtype=q.dtype)
    d = jnp.take(q, c, axis=-1)[:, None] * (e_c - q)
    return d * (1 - outputs) if output == "sigmoid" else d


def analysis(params, state, image: jax.Array, spec: model.ModelSpec, dtype):
    """One drawing through the K models, in evaluation mode; the only function here that runs a
    model.

    params, state: every model's params and model state (batch-norm statistics; empty for most
    models) stacked on a leading axis of K; image: uint8 (28, 28). Returns (digit, probabilities
    (C,) averaged over the models, input (28, 28) in [0, 1], saliency by the hand-derived
    backward (28, 28), saliency by jax.grad (28, 28)).
    """
    x = model.inputs(image[None], spec, dtype)  # (1, *spec.input_shape)

    def probabilities(x):  # (K, C): each model's shown probabilities
        shown = lambda p, s: shown_probabilities(model.apply(p, x, spec, s), spec.output)[0]  # noqa: E731
        return jax.vmap(shown)(params, state)

    mean = probabilities(x).mean(axis=0)
    c = jnp.argmax(mean)

    def manual(p, s):  # d q_c / d x of one model, by the hand-derived backward pass
        outputs = model.activate(model.logits(p, x, spec, state=s), spec.output)
        return backprop.input_gradient(p, x, spec, probability_cotangent(outputs, c, spec.output), s)

    saliency_manual = jax.vmap(manual)(params, state).mean(axis=0)
    saliency_autodiff = jax.grad(lambda x: probabilities(x)[:, c].mean())(x)
    side = image.shape
    return c, mean, x.reshape(side), saliency_manual.reshape(side), saliency_autodiff.reshape(side)


@dataclasses.dataclass
class Analyser:
    """A trained run, ready to analyse drawings: `analyse(png_bytes)` -> the API's JSON dict."""

    params: object  # K models' params, stacked on a leading axis, on the default device
    state: object  # their model states, likewise
    spec: model.ModelSpec
    dtype: object
    x64: bool
    info: dict  # GET /api/model

    def __post_init__(self):
        self.compiled = compiling.jit(functools.partial(analysis, spec=self.spec, dtype=self.dtype),
                                      platform=jax.default_backend())  # where the params are

    def analyse_image(self, image: np.ndarray) -> dict:
        """uint8 (28, 28) -> the API's dict. Thread-safe; x64 is per thread, so it is set here."""
        with jax.enable_x64(self.x64):
            found = self.compiled(self.params, self.state, jnp.asarray(image))
            c, probabilities, x, manual, autodiff = jax.device_get(found)
        return {"digit": int(c), "probabilities": probabilities.tolist(), "input": x.tolist(),
                "saliency_manual": manual.tolist(), "saliency_autodiff": autodiff.tolist(),
                "max_abs_difference": float(np.max(np.abs(manual - autodiff)))}

    def analyse(self, body: bytes) -> dict:
        """An image file's bytes -> the API's dict; RequestError(400) if it is not a usable image."""
        return self.analyse_image(preprocess(body))

    def warm_up(self) -> float:
        """Compiles the analysis (before the server starts); returns the seconds it took."""
        started = time.perf_counter()
        image = np.zeros((predict.MNIST_SIZE, predict.MNIST_SIZE), np.uint8)
        image[4:24, 12:16] = 255
        self.analyse_image(image)
        return time.perf_counter() - started


def preprocess(body: bytes) -> np.ndarray:
    """An image file's bytes -> uint8 (28, 28), by `predict.preprocess_file`: the same code as
    `--mode=predict`, on the same kind of input (a file)."""
    width, height = image_size(body)
    if width * height > MAX_PIXELS:
        raise RequestError(413, f"image too large ({width} x {height} pixels; at most {MAX_PIXELS})")
    with tempfile.TemporaryDirectory(prefix="digits-serve-") as tmp:
        path = pathlib.Path(tmp) / "body"
        path.write_bytes(body)
        try:
            return predict.preprocess_file(path)
        except predict.ImageError as e:
            raise RequestError(400, f"the request body is not a usable image: {e.reason}") from None


def image_size(body: bytes) -> tuple[int, int]:
    """(width, height) from an image file's header; (0, 0) when PIL cannot tell (then
    `predict.preprocess_file` says why, in --mode=predict's words)."""
    try:
        with Image.open(io.BytesIO(body)) as img:
            return img.size
    except Exception:  # PIL signals a bad header with many exception types
        return 0, 0


def describe(config, plan, workdir: pathlib.Path) -> dict:
    c = config
    return {"workdir": str(workdir), "network": c.layers or "-".join(map(str, c.layer_sizes)),
            "activation": c.activation, "output": c.output, "models": c.num_models,
            "classes": plan.spec.num_classes, "dataset": c.dataset,
            "probabilities": "mean of the models' probabilities" if c.num_models > 1 else "the model's probabilities",
            "saliency": "d p_c / d x: the shown probability of the predicted class c, by input pixel"}


def load(workdir: pathlib.Path, given: dict | None = None) -> Analyser:
    """Every model of a training workdir, at its latest checkpoint, ready to serve. `given`: flag
    values that say where the data is (as for --mode=eval). A run that cannot be served (no
    run, no checkpoint, a corrupt one, images that are not 28x28) is a UsageError."""
    config = experiment.run_config(workdir, given)
    with experiment.precision(config):
        config, dataset, plan, state = experiment.restore_trained(workdir, config)
        if dataset.image_shape != (predict.MNIST_SIZE, predict.MNIST_SIZE):
            raise experiment.ConfigError(
                f"the drawing page makes 28x28 MNIST-style inputs, but the model in {workdir} takes "
                f"{'x'.join(map(str, dataset.image_shape))} images")
        models = jax.device_get(train.reported_model(state))  # off the run's mesh (with --ema_decay: the averages)
        if not plan.vmapped:
            models = jax.tree.map(lambda leaf: leaf[None], models)
        params, model_state = jax.device_put(models)  # onto the one default device
    return Analyser(params, model_state, plan.spec, plan.dtype, config.x64, describe(config, plan, workdir))


# --- HTTP -------------------------------------------------------------------------------------


def asset(name: str) -> bytes:
    return importlib.resources.files("digits").joinpath("static", name).read_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    """GET the page and its assets, GET /api/model, POST /api/predict; everything else is a
    4xx JSON error. `self.server.analyser` is the model, `self.server.assets` the files."""

    server_version = "digits-serve"
    timeout = 30  # a client that stops sending mid-request does not hold a thread for ever
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._answer("GET", self._get)

    def do_POST(self):
        self._answer("POST", self._post)

    def _answer(self, method: str, respond) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path not in ALLOWED:
                raise RequestError(404, f"no such path: {path} (the page is /, the API POST {PREDICT_PATH})")
            if ALLOWED[path] != method:
                self._drain()
                raise RequestError(405, f"{method} {path} is not allowed (use {ALLOWED[path]})")
            respond(path)
        except RequestError as e:
            self._send_json(e.status, {"error": str(e)}, allow=ALLOWED.get(path))
        except Exception as e:  # a bug, not the client's fault: say so, and go on serving
            self.log_error("%s %s failed: %r", method, path, e)
            self.close_connection = True
            self._send_json(500, {"error": f"internal error: {' '.join(str(e).split()) or type(e).__name__}"})

    def _get(self, path: str) -> None:
        if path == MODEL_PATH:
            self._send_json(200, self.server.analyser.info)
        else:
            name, content_type = ASSETS[path]
            self._send(200, self.server.assets[name], content_type)

    def _post(self, path: str) -> None:
        self._send_json(200, self.server.analyser.analyse(self._body()))

    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(411, "chunked bodies are not accepted; send a Content-Length")
        text = self.headers.get("Content-Length")
        if text is None:
            raise RequestError(411, "the request needs a Content-Length header")
        if not text.strip().isdigit():
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length: {text!r}")
        return int(text)

    def _body(self) -> bytes:
        length = self._content_length()
        if length > MAX_BODY_BYTES:
            self._drain(length)
            raise RequestError(413, f"request body too large ({length} bytes; at most {MAX_BODY_BYTES})")
        if length == 0:
            raise RequestError(400, "empty request body; POST an image (PNG)")
        return self.rfile.read(length)

    def _drain(self, length: int | None = None) -> None:
        """Reads and drops a body we will not use, so the client sees our answer rather than a
        reset connection; a huge one is not read, and the connection closes after the answer."""
        if length is None:
            try:
                length = self._content_length()
            except RequestError:
                return
        if length > 16 * MAX_BODY_BYTES:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 2**16))
            if not chunk:
                break
            length -= len(chunk)

    def _send_json(self, status: int, payload: dict, allow: str | None = None) -> None:
        headers = {"Allow": allow} if status == 405 and allow else {}
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request, an unknown method) as JSON too; an
        unknown method is 405, not http.server's 501."""
        if code == 501:
            code, message = 405, f"method {self.command} is not allowed (use GET or POST)"
        self.close_connection = True
        try:
            self._send_json(code, {"error": " ".join(str(message or self.responses.get(code, ("error",))[0]).split())})
        except OSError:
            pass  # the client went away

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for open connections

    def __init__(self, address, analyser: Analyser):
        self.analyser = analyser
        self.assets = {name: asset(name) for name, _ in ASSETS.values()}
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def make_server(analyser: Analyser | None, host: str = "127.0.0.1", port: int = 0) -> Server:
    """A server bound to host:port (port 0: a free one); UsageError when it cannot bind. It
    answers once `serve_forever` runs, with `server.analyser` set by then."""
    try:
        return Server((host, port), analyser)
    except OSError as e:
        raise experiment.UsageError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def run(workdir: pathlib.Path, host: str = "127.0.0.1", port: int = 8000, given: dict | None = None) -> None:
    """--mode=serve: binds the port (a port in use fails at once), loads and compiles the models,
    then serves until Ctrl-C."""
    server = make_server(None, host, port)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        server.analyser = load(workdir, given)
        compile_s = server.analyser.warm_up()
        info = server.analyser.info
        models = f"ensemble of {info['models']} models" if info["models"] > 1 else "one model"
        print(f"Model: {info['network']} {info['activation']}/{info['output']} from {workdir}, {models} "
              f"(compiled in {compile_s:.2f} s)")
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"Listening on {host}: anyone who can reach this address can use the page")
        print(f"Serving the drawing page at {server.url} (Ctrl-C stops)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not interrupt the shutdown
        print("Stopped serving", flush=True)
    finally:
        signal.signal(signal.SIGINT, previous)
        server.server_close()
