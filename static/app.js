// The explorer's small client: plots from data-* attributes, the probe's token picker,
// and the steering chat (a fetch of /api/v1/steer read as server-sent events).
"use strict";

htmx.config.responseHandling = [
  { code: "204", swap: false },
  { code: "[23]..", swap: true },
  { code: "[45]..", swap: true, error: true },  // field errors and messages come as fragments
];

const PLOT_LAYOUT = { margin: { l: 48, r: 12, t: 8, b: 36 }, height: 230 };

function drawPlots(root) {
  root.querySelectorAll("[data-plot]").forEach((el) => {
    const data = JSON.parse(el.dataset.series || "{}");
    const layout = { ...PLOT_LAYOUT, xaxis: { title: { text: el.dataset.xTitle || "" } },
                     yaxis: { title: { text: el.dataset.yTitle || "" } } };
    let traces;
    if (el.dataset.plot === "hist") {
      const edges = data.edges || [];
      const centers = edges.slice(0, -1).map((e, i) => (e + edges[i + 1]) / 2);
      const widths = edges.slice(0, -1).map((e, i) => edges[i + 1] - e);
      traces = [{ type: "bar", x: centers, y: data.counts || [], width: widths, marker: { color: "#d95f00" } }];
      layout.xaxis.type = "log";
      traces[0].x = centers;
    } else if (el.dataset.plot === "bar") {
      traces = [{ type: "bar", x: data.x || [], y: data.y || [], marker: { color: "#2458d6" } }];
    } else {
      traces = [{ type: "scatter", mode: "lines", x: data.x || [], y: data.y || [], line: { color: "#d95f00" } }];
      layout.yaxis.type = "log";
    }
    Plotly.react(el, traces, layout, { displayModeBar: false, responsive: true });
  });
}

function tokenPicker(root) {
  root.querySelectorAll("[data-token-picker]").forEach((box) => {
    if (box.dataset.bound) return;
    box.dataset.bound = "1";
    box.addEventListener("click", (event) => {
      const button = event.target.closest("button.pick");
      if (!button) return;
      box.querySelectorAll("button.pick.selected").forEach((b) => b.classList.remove("selected"));
      button.classList.add("selected");
      document.querySelectorAll(".token-features").forEach((d) => { d.hidden = true; });
      const panel = document.getElementById(`token-${button.dataset.pos}`);
      if (panel) panel.hidden = false;
    });
  });
}

function addSteerRow(index, explanation) {
  const set = document.getElementById("steer-set");
  if (!set || set.querySelector(`tr[data-index="${index}"]`)) return;
  const row = document.getElementById("steer-row-template").content.firstElementChild.cloneNode(true);
  const sae = document.getElementById("steer").dataset.sae;
  row.dataset.index = index;
  const link = row.querySelector("a");
  link.textContent = `#${index}`;
  link.href = `/saes/${sae}/features/${index}`;
  row.querySelector(".explanation-cell").textContent = explanation || "";
  set.appendChild(row);
}

function steerFeatures() {
  return [...document.querySelectorAll("#steer-set tr.steer-row")].map((row) => ({
    index: Number(row.dataset.index),
    mode: row.querySelector("select[name=mode]").value,
    value: Number(row.querySelector("input[name=value]").value),
  }));
}

async function streamSteer(form) {
  const out = { baseline: document.getElementById("reply-baseline"),
                steered: document.getElementById("reply-steered") };
  const error = document.getElementById("steer-error");
  const send = document.getElementById("send");
  out.baseline.textContent = ""; out.steered.textContent = ""; error.hidden = true;
  const body = {
    sae_id: Number(document.getElementById("steer").dataset.sae),
    prompt: form.prompt.value, features: steerFeatures(),
    temperature: Number(form.temperature.value), max_tokens: Number(form.max_tokens.value),
    seed: Number(form.seed.value), steer_special: form.steer_special.checked,
  };
  send.disabled = true;
  document.getElementById("steer").dataset.state = "streaming";
  try {
    const response = await fetch("/api/v1/steer", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!response.ok) {
      const detail = await response.json().catch(() => ({ detail: response.statusText }));
      throw new Error(detail.detail || response.statusText);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        handleEvent(buffer.slice(0, cut), out);
        buffer = buffer.slice(cut + 2);
      }
    }
  } catch (err) {
    error.textContent = err.message; error.hidden = false;
  } finally {
    send.disabled = false;
    document.getElementById("steer").dataset.state = "done";
  }
}

function handleEvent(block, out) {
  const lines = block.split("\n");
  const kind = (lines.find((l) => l.startsWith("event: ")) || "event: message").slice(7);
  const data = JSON.parse((lines.find((l) => l.startsWith("data: ")) || "data: {}").slice(6));
  if (kind === "token") out[data.side].textContent += data.text;
  if (kind === "error") throw new Error(data.detail);
}

function steerPage() {
  const form = document.getElementById("chat-form");
  if (!form) return;
  form.addEventListener("submit", (event) => { event.preventDefault(); streamSteer(form); });
  document.addEventListener("click", (event) => {
    const add = event.target.closest("button.add-feature");
    if (add) addSteerRow(add.dataset.index, add.dataset.explanation);
    const remove = event.target.closest("#steer-set button.remove");
    if (remove) remove.closest("tr").remove();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  drawPlots(document); tokenPicker(document); steerPage();
});
document.addEventListener("htmx:afterSettle", (event) => {
  drawPlots(event.detail.elt.parentElement || document);
  tokenPicker(event.detail.elt.parentElement || document);
});

// The job form shows only the fields the chosen kind reads.
function showFieldsOfKind(form) {
  const kind = form.querySelector("select[name=kind]").value;
  form.querySelectorAll("[data-kinds]").forEach((field) => {
    field.hidden = !field.dataset.kinds.split(" ").includes(kind);
  });
}
document.addEventListener("change", (event) => {
  if (event.target.matches("#job-form select[name=kind]")) showFieldsOfKind(event.target.form);
});
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("job-form");
  if (form) showFieldsOfKind(form);
});
document.addEventListener("htmx:afterSwap", () => {
  const form = document.getElementById("job-form");
  if (form) showFieldsOfKind(form);
});
