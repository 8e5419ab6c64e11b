// The built-in page: live status from v1/mlx/status (+ /metrics for latencies) and a
// streaming chat playground. Relative URLs only, so it works under a proxy's path prefix.
// Model output goes into the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1000;
const CHART_SECONDS = 300;
const KEY_STORAGE = "mlx-server-api-key";

const $ = (id) => document.getElementById(id);

// --- API key: asked for on a 401, kept for this tab only -------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, init = {}) {
  const headers = Object.assign({}, init.headers || {}, authHeaders());
  const resp = await fetch(path, Object.assign({}, init, { headers }));
  if (resp.status === 401) {
    $("key-form").hidden = false;
  }
  return resp;
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
  $("key-input").value = "";
  $("key-form").hidden = true;
});

// --- Status -----------------------------------------------------------------------------------

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

function bytes(n) {
  let i = 0;
  while (n >= 1024 && i < UNITS.length - 1) {
    n /= 1024;
    i += 1;
  }
  return (i ? n.toFixed(1) : String(n)) + " " + UNITS[i];
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + (s % 60) + "s";
}

function ms(seconds) {
  return (seconds * 1000).toFixed(1) + " ms";
}

function show(id, value) {
  $(id).textContent = value;
}

function setState(state) {
  $("state").dataset.state = state;
  $("state").textContent = state;
}

// (time in s, tokens/s) over the last CHART_SECONDS.
const history = [];
let previous = null; // the last status: {t, tokens, restarts}

function recordRate(now, engine) {
  const prev = previous;
  previous = { t: now, tokens: engine.tokens_generated, restarts: engine.restarts };
  // A restarted engine counts from zero again: no rate across the restart.
  if (!prev || prev.restarts !== engine.restarts || engine.tokens_generated < prev.tokens) {
    return null;
  }
  const rate = (engine.tokens_generated - prev.tokens) / Math.max(now - prev.t, 1e-3);
  history.push([now, rate]);
  while (history.length && history[0][0] < now - CHART_SECONDS) {
    history.shift();
  }
  return rate;
}

function drawChart(now) {
  const top = Math.max(1, ...history.map((p) => p[1]));
  const points = history.map(([t, rate]) => {
    const x = 300 - ((now - t) / CHART_SECONDS) * 300;
    const y = 100 - (rate / top) * 96;
    return x.toFixed(1) + "," + y.toFixed(1);
  });
  $("chart-line").setAttribute("points", points.join(" "));
  show("chart-max", top.toFixed(1));
}

function showStatus(body) {
  const engine = body.engine;
  const now = performance.now() / 1000;
  setState(engine.state);
  show("s-model", body.model.id);
  show("s-adapter", body.model.adapter || "none");
  show("s-context", String(body.model.context_length));
  show("s-uptime", duration(engine.uptime_s));
  show("s-restarts", String(engine.restarts));
  show("s-running", String(engine.running_requests));
  show("s-queued", String(engine.queued_requests));
  show("s-tokens", String(engine.tokens_generated));
  show("s-cache-entries", String(body.prompt_cache.entries));
  show("s-cache-hits", body.prompt_cache.hits + " (" + body.prompt_cache.hit_tokens + " tokens)");
  show("s-cache-bytes", bytes(body.prompt_cache.bytes));
  show("s-mem-active", bytes(body.memory.active_bytes));
  show("s-mem-peak", bytes(body.memory.peak_bytes));
  const rate = recordRate(now, engine);
  if (rate !== null) {
    show("s-tps", rate.toFixed(1));
  }
  drawChart(now);
}

// Sum of a metric's samples over all its label sets, from Prometheus' text format.
function metricSum(text, name) {
  let total = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith(name + " ") || line.startsWith(name + "{")) {
      total += parseFloat(line.slice(line.lastIndexOf(" ") + 1));
    }
  }
  return total;
}

async function pollMetrics() {
  const resp = await fetch("metrics");
  if (!resp.ok) {
    return;
  }
  const text = await resp.text();
  for (const [id, name] of [
    ["s-ttft", "mlx_server_time_to_first_token_seconds"],
    ["s-itl", "mlx_server_inter_token_latency_seconds"],
  ]) {
    const count = metricSum(text, name + "_count");
    show(id, count ? ms(metricSum(text, name + "_sum") / count) : "–");
  }
}

async function poll() {
  try {
    const resp = await api("v1/mlx/status");
    if (resp.ok) {
      showStatus(await resp.json());
      await pollMetrics();
    } else if (resp.status === 401) {
      setState("needs API key");
    } else {
      // 503: the frontend is up but the engine does not answer (restarting).
      setState("restarting");
    }
  } catch (err) {
    setState("unreachable");
  }
  setTimeout(poll, POLL_MS);
}

// --- Playground -------------------------------------------------------------------------------

const messages = [];
let controller = null;

function turn(role) {
  const div = document.createElement("div");
  div.className = "turn";
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const reasoning = document.createElement("div");
  reasoning.className = "reasoning";
  const text = document.createElement("div");
  text.className = "text";
  const stats = document.createElement("div");
  stats.className = "stats";
  div.append(label, reasoning, text, stats);
  $("transcript").append(div);
  return { div, reasoning, text, stats };
}

function chatRequest() {
  const body = {
    model: $("s-model").textContent,
    messages: [],
    stream: true,
    stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value),
    max_tokens: parseInt($("max-tokens").value, 10),
  };
  const system = $("system").value.trim();
  if (system) {
    body.messages.push({ role: "system", content: system });
  }
  body.messages.push(...messages);
  const stop = $("stop").value.split("\n").filter((s) => s.length);
  if (stop.length) {
    body.stop = stop;
  }
  return body;
}

// Calls onEvent with each JSON payload of a server-sent event stream.
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) {
      return;
    }
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      if (data && data !== "[DONE]") {
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  messages.push({ role: "user", content: prompt });
  turn("user").text.textContent = prompt;
  $("prompt").value = "";
  const out = turn("assistant");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop-button").disabled = false;
  let firstTokenAt = null;
  let usage = null;
  let finish = null;
  try {
    const resp = await api("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(chatRequest()),
      signal: controller.signal,
    });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      const message = (body.error && body.error.message) || resp.statusText;
      throw new Error(resp.status === 401 ? "enter the API key above, then send again" : message);
    }
    await readEvents(resp, (chunk) => {
      if (chunk.error) {
        throw new Error(chunk.error.message);
      }
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (firstTokenAt === null && (delta.content || delta.reasoning_content)) {
          firstTokenAt = performance.now();
        }
        if (delta.reasoning_content) {
          out.reasoning.textContent += delta.reasoning_content;
        }
        if (delta.content) {
          out.text.textContent += delta.content;
        }
        finish = choice.finish_reason || finish;
      }
      usage = chunk.usage || usage;
    });
    messages.push({ role: "assistant", content: out.text.textContent });
    let stats = "finish: " + finish;
    if (usage) {
      stats += " · prompt " + usage.prompt_tokens + " · completion " + usage.completion_tokens + " tokens";
      const seconds = firstTokenAt === null ? 0 : (performance.now() - firstTokenAt) / 1000;
      if (seconds > 0 && usage.completion_tokens > 1) {
        stats += " · " + ((usage.completion_tokens - 1) / seconds).toFixed(1) + " tokens/s";
      }
    }
    out.stats.textContent = stats;
  } catch (err) {
    messages.pop();
    out.stats.classList.add("error");
    out.stats.textContent = err.name === "AbortError" ? "stopped" : "error: " + err.message;
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop-button").disabled = true;
  }
}

$("chat-form").addEventListener("submit", send);
$("stop-button").addEventListener("click", () => controller && controller.abort());

poll();
