// The drawing page: pointer events draw on the canvas; each change is sent (as PNG, one request
// at a time, the latest drawing last) to POST /api/predict, whose JSON the page shows.
"use strict";

(() => {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const LINE_WIDTH = pad.width / 12; // ~2 px of the 28x28 input once the digit is scaled to 20 px
  const $ = (id) => document.getElementById(id);

  let stroke = null; // {id, last}: the pointer drawing now
  let dirty = false; // the drawing changed since the last request was sent
  let inFlight = false;
  let generation = 0; // bumped by Clear: answers about an older drawing are dropped
  let requests = 0;

  function setState(state, message) {
    document.body.dataset.state = state;
    if (message !== undefined) $("status").textContent = message;
  }

  // --- drawing ---------------------------------------------------------------------------------

  function clearPad() {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, pad.width, pad.height);
    ctx.strokeStyle = ctx.fillStyle = "#000";
    ctx.lineWidth = LINE_WIDTH;
    ctx.lineCap = ctx.lineJoin = "round";
  }

  function at(event) {
    const box = pad.getBoundingClientRect();
    return { x: ((event.clientX - box.left) * pad.width) / box.width, y: ((event.clientY - box.top) * pad.height) / box.height };
  }

  function segment(from, to) {
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }

  function dot(p) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, LINE_WIDTH / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  pad.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    event.preventDefault();
    try {
      pad.setPointerCapture(event.pointerId); // keep the stroke when the pointer leaves the canvas
    } catch (_) {
      // not an active pointer any more: nothing to capture
    }
    stroke = { id: event.pointerId, last: at(event) };
    dot(stroke.last);
    changed();
  });

  pad.addEventListener("pointermove", (event) => {
    if (!stroke || event.pointerId !== stroke.id) return;
    const coalesced = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of coalesced.length ? coalesced : [event]) {
      const p = at(e);
      segment(stroke.last, p);
      stroke.last = p;
    }
    changed();
  });

  for (const type of ["pointerup", "pointercancel"]) {
    pad.addEventListener(type, (event) => {
      if (stroke && event.pointerId === stroke.id) {
        stroke = null;
        changed();
      }
    });
  }

  $("clear").addEventListener("click", () => {
    generation += 1;
    dirty = false;
    clearPad();
    showResult(null);
    setState("empty", "Draw with the mouse or a finger.");
  });

  // --- asking the server -----------------------------------------------------------------------

  function changed() {
    dirty = true;
    setState("busy");
    send();
  }

  async function post(blob) {
    const response = await fetch("api/predict", { method: "POST", headers: { "Content-Type": "image/png" }, body: blob });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }

  function send() {
    if (inFlight || !dirty) return;
    dirty = false;
    inFlight = true;
    const sent = generation;
    pad.toBlob(async (blob) => {
      let failed = null;
      try {
        const result = await post(blob);
        if (sent === generation) showResult(result);
      } catch (error) {
        failed = error;
      }
      requests += 1;
      document.body.dataset.requests = String(requests);
      inFlight = false;
      if (dirty) send();
      else if (sent !== generation) return;
      else if (failed) setState("error", `error: ${failed.message}`);
      else setState("ready", "Draw on to change it, or clear.");
    }, "image/png");
  }

  // --- showing the answer ----------------------------------------------------------------------

  function probabilityRows(classes) {
    const list = $("probabilities");
    list.replaceChildren();
    for (let c = 0; c < classes; c += 1) {
      const row = document.createElement("li");
      row.dataset.class = String(c);
      row.innerHTML = `<span class="class">${c}</span><span class="bar"><span class="fill"></span></span><span class="value"></span>`;
      list.append(row);
    }
  }

  function paint(canvas, rows, colour) {
    const height = rows.length, width = rows[0].length;
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    const image = context.createImageData(width, height);
    rows.flat().forEach((value, i) => image.data.set([...colour(value), 255], 4 * i));
    context.putImageData(image, 0, 0);
  }

  function blank(canvas) {
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  }

  function diverging(scale) {
    return (value) => {
      const t = Math.round((255 * Math.min(Math.abs(value), scale)) / scale);
      return value >= 0 ? [255, 255 - t, 255 - t] : [255 - t, 255 - t, 255];
    };
  }

  function showResult(result) {
    const rows = $("probabilities").children;
    if (!result) {
      $("digit").textContent = "\u2013";
      $("difference").textContent = $("scale").textContent = "\u2013";
      for (const row of rows) {
        row.classList.remove("predicted");
        delete row.dataset.probability;
        row.querySelector(".fill").style.width = "0";
        row.querySelector(".value").textContent = "";
      }
      for (const id of ["input", "saliency-manual", "saliency-autodiff"]) blank($(id));
      return;
    }
    if (rows.length !== result.probabilities.length) probabilityRows(result.probabilities.length);
    $("digit").textContent = String(result.digit);
    result.probabilities.forEach((p, c) => {
      const row = rows[c];
      row.dataset.probability = String(p);
      row.classList.toggle("predicted", c === result.digit);
      row.querySelector(".fill").style.width = `${(100 * p).toFixed(2)}%`;
      row.querySelector(".value").textContent = `${(100 * p).toFixed(1)}%`;
    });
    paint($("input"), result.input, (v) => Array(3).fill(Math.round(255 * v)));
    const peak = Math.max(...result.saliency_manual.flat().map(Math.abs), ...result.saliency_autodiff.flat().map(Math.abs));
    const scale = peak > 0 ? peak : 1;
    paint($("saliency-manual"), result.saliency_manual, diverging(scale));
    paint($("saliency-autodiff"), result.saliency_autodiff, diverging(scale));
    $("scale").textContent = scale.toExponential(2);
    $("difference").textContent = result.max_abs_difference.toExponential(2);
    $("difference").dataset.value = String(result.max_abs_difference);
  }

  async function describeModel() {
    try {
      const response = await fetch("api/model");
      const info = await response.json();
      const models = info.models > 1 ? `ensemble of ${info.models} models (the mean of their probabilities)` : "one model";
      $("model").textContent = `${info.network} ${info.activation}/${info.output}, ${models}, from ${info.workdir}`;
      if ($("probabilities").children.length !== info.classes) probabilityRows(info.classes);
    } catch (error) {
      $("model").textContent = `cannot reach the server: ${error.message}`;
    }
  }

  clearPad();
  probabilityRows(10);
  describeModel();
})();
