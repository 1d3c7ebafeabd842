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
      if (data.values) traces = [{ type: "histogram", x: data.values, marker: { color: "#2458d6" } }];
    } else if (el.dataset.plot === "frontier") {
      const colours = (data.current || []).map((c) => (c ? "#d95f00" : "#2458d6"));
      traces = [{ type: "scatter", mode: "markers+text", x: data.x || [], y: data.y || [],
                  text: data.text || [], textposition: "top center", customdata: data.ids || [],
                  marker: { color: colours, size: 10 } }];
    } else if (el.dataset.plot === "bar") {
      traces = [{ type: "bar", x: data.x || [], y: data.y || [], marker: { color: "#2458d6" } }];
    } else {
      traces = [{ type: "scatter", mode: "lines", x: data.x || [], y: data.y || [], line: { color: "#d95f00" } }];
      layout.yaxis.type = "log";
    }
    Plotly.react(el, traces, layout, { displayModeBar: false, responsive: true });
    if (el.dataset.plot === "frontier" && !el.dataset.bound) {
      el.dataset.bound = "1";
      el.on("plotly_click", (event) => { window.location = `/saes/${event.points[0].customdata}`; });
    }
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
    format: form.format.value, top_p: Number(form.top_p.value),
    frequency_penalty: Number(form.frequency_penalty.value),
    top_logprobs: form.alternatives.checked ? 5 : 0,
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
  if (kind === "token" && data.top) out[data.side].appendChild(pieceWithAlternatives(data));
  else if (kind === "token") out[data.side].append(data.text);
  if (kind === "error") throw new Error(data.detail);
}

// One reply piece whose tooltip lists the most likely tokens of the step that made it.
function pieceWithAlternatives(data) {
  const span = document.createElement("span");
  span.className = "piece";
  span.textContent = data.text;
  span.title = data.top.map((t) =>
    `${JSON.stringify(t.token)}  ${(100 * Math.exp(t.logprob)).toFixed(1)}%`).join("\n");
  return span;
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


// The feature map: every placed latent as one WebGL point.
async function drawFeatureMap() {
  const el = document.getElementById("feature-map");
  if (!el) return;
  const data = await (await fetch(el.dataset.src)).json();
  const sae = el.dataset.sae;
  const labels = data.label.map((l, i) => `#${data.index[i]} ${l || "(no label)"}`);
  const colourOf = {
    density: data.density.map((d) => Math.log10(Math.max(d, 1e-7))),
    label: data.label.map((l) => (l ? 1 : 0)),
    steerability: data.steerability.map((s) => (s === null ? -0.1 : s)),
    sink: data.sink.map((s) => (s ? 1 : 0)),
  };
  const draw = () => {
    const colour = document.getElementById("map-colour").value;
    const query = document.getElementById("map-search").value.trim().toLowerCase();
    const hits = data.label.map((l) => !!query && (l || "").toLowerCase().includes(query));
    const trace = {
      type: "scattergl", mode: "markers", x: data.x, y: data.y, text: labels,
      hoverinfo: "text", customdata: data.index,
      marker: { size: hits.map((h) => (h ? 9 : 4)), color: colourOf[colour],
                colorscale: "Viridis", showscale: true,
                opacity: query ? hits.map((h) => (h ? 1 : 0.15)) : 0.8 },
    };
    Plotly.react(el, [trace], { margin: { l: 20, r: 20, t: 10, b: 20 }, height: 640,
                                xaxis: { visible: false }, yaxis: { visible: false } },
                 { responsive: true, displaylogo: false });
    const count = document.getElementById("map-count");
    count.textContent = query ? `${hits.filter(Boolean).length} of ${data.x.length} match`
                              : `${data.x.length} latents`;
  };
  draw();
  el.on("plotly_click", (event) => {
    const point = event.points && event.points[0];
    if (point) window.location.href = `/saes/${sae}/features/${point.customdata}`;
  });
  document.getElementById("map-colour").addEventListener("change", draw);
  document.getElementById("map-search").addEventListener("input", draw);
  el.dataset.state = "drawn";
}
document.addEventListener("DOMContentLoaded", drawFeatureMap);


// The strength sweep: one column per strength, each streamed from /v1/chat/completions.
async function streamColumn(form, strength, out) {
  const body = {
    model: form.dataset.model, stream: true, seed: Number(form.seed.value),
    max_tokens: Number(form.max_tokens.value), temperature: Number(form.temperature.value),
    messages: [{ role: "user", content: form.prompt.value }],
    steer: { sae: Number(form.dataset.sae),
             latents: strength === 0 ? [] : [{ index: Number(form.dataset.index),
                                              mode: form.mode.value, value: strength }] },
  };
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (!response.ok) { out.textContent = (await response.json()).detail; return; }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) { out.textContent += ` [${chunk.error.message}]`; return; }
      out.textContent += chunk.choices[0].delta.content || "";
    }
  }
}

document.addEventListener("submit", async (event) => {
  if (event.target.id !== "sweep-form") return;
  event.preventDefault();
  const form = event.target;
  const strengths = form.strengths.value.split(",").map(Number).filter((v) => !Number.isNaN(v));
  const columns = document.getElementById("sweep-columns");
  columns.innerHTML = "";
  columns.dataset.state = "streaming";
  const outs = strengths.map((strength) => {
    const section = document.createElement("section");
    section.innerHTML = `<h2>${strength === 0 ? "unsteered" : `${form.mode.value} ${strength}×`}</h2>`;
    const pre = document.createElement("pre");
    pre.className = "reply";
    section.appendChild(pre);
    columns.appendChild(section);
    return pre;
  });
  await Promise.all(strengths.map((s, i) => streamColumn(form, s, outs[i])));
  columns.dataset.state = "done";
});
