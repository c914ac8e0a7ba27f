"use strict";
// The chat page of `ossgpt serve`. It uses the server's own API as any client would: GET
// /v1/models, POST /v1/chat/completions with stream: true. Conversations, settings and the API
// key live in this browser's localStorage. Model text is only ever put in the page as text
// (textContent, or renderMarkdown's DOM nodes), never as HTML.

const $ = (id) => document.getElementById(id);
const MAX_TOOL_ROUNDS = 8;  // a model that keeps calling tools is stopped after this many

const store = {
  get(key, fallback) {
    try {
      const value = localStorage.getItem("ossgpt." + key);
      return value === null ? fallback : JSON.parse(value);
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      localStorage.setItem("ossgpt." + key, JSON.stringify(value));
    } catch (e) {  // full, or storage disabled: the chat goes on, unsaved
      status("Could not save in this browser: " + e.message);
    }
  },
};

let conversations = store.get("conversations", []);
let currentId = store.get("current", null);
const settings = {model: "", effort: "medium", temperature: 1, tools: false,
                  ...store.get("settings", {})};
let running = null;    // the AbortController of the reply being generated
let demoTools = null;  // the server's demo tool definitions, fetched when first needed

class HTTPError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function status(text) {
  $("status").textContent = text || "";
}

function headers() {
  const key = store.get("apiKey", "");
  return key ? {"Content-Type": "application/json", Authorization: "Bearer " + key}
             : {"Content-Type": "application/json"};
}

// fetch, with the key; an error status becomes an HTTPError carrying the server's message
// (OpenAI's {"error": {"message"}} shape).
async function request(path, options = {}) {
  const res = await fetch(path, {...options, headers: headers()});
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try {
      message = (await res.json()).error.message || message;
    } catch { /* not JSON: keep the status line */ }
    throw new HTTPError(res.status, message);
  }
  return res;
}

// -- the API key -----------------------------------------------------------------------------

function askForKey() {
  $("key-error").textContent = store.get("apiKey", "") ? "The server refused this key." : "";
  $("key-input").value = "";
  $("key-button").hidden = false;
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

$("key-form").addEventListener("submit", () => {
  store.set("apiKey", $("key-input").value.trim());
  loadModels();
});
$("key-button").addEventListener("click", askForKey);

async function loadModels() {
  try {
    const models = (await (await request("v1/models")).json()).data.map((m) => m.id);
    const select = $("model");
    select.replaceChildren(...models.map((id) => new Option(id, id)));
    if (!models.includes(settings.model)) settings.model = models[0];
    select.value = settings.model;
    document.body.dataset.state = "idle";
    status("");
  } catch (e) {
    if (e.status === 401) askForKey();
    else status("Cannot reach the server: " + e.message);
  }
}

// -- settings --------------------------------------------------------------------------------

function bindSettings() {
  $("effort").value = settings.effort;
  $("temperature").value = settings.temperature;
  $("tools").checked = settings.tools;
  const save = () => {
    const t = parseFloat($("temperature").value);
    settings.temperature = Number.isFinite(t) ? Math.min(2, Math.max(0, t)) : 1;
    Object.assign(settings, {model: $("model").value, effort: $("effort").value,
                             tools: $("tools").checked});
    store.set("settings", settings);
  };
  for (const id of ["model", "effort", "temperature", "tools"]) {
    $(id).addEventListener("change", save);
    $(id).addEventListener("input", save);
  }
}

// -- conversations ---------------------------------------------------------------------------

function current() {
  return conversations.find((c) => c.id === currentId) || null;
}

function save() {
  store.set("conversations", conversations);
  store.set("current", currentId);
}

function select(id) {
  if (running) return;
  currentId = id;
  save();
  renderList();
  renderMessages();
}

function renderList() {
  const items = conversations.map((c) => {
    const li = document.createElement("li");
    li.classList.toggle("current", c.id === currentId);
    const open = document.createElement("button");
    open.className = "open";
    open.textContent = c.title;
    open.title = c.title;
    open.addEventListener("click", () => select(c.id));
    const remove = document.createElement("button");
    remove.className = "delete";
    remove.textContent = "×";
    remove.title = "Delete this conversation";
    remove.addEventListener("click", () => {
      if (running && c.id === currentId) return;
      conversations = conversations.filter((x) => x !== c);
      if (c.id === currentId) currentId = null;
      save();
      renderList();
      renderMessages();
    });
    li.append(open, remove);
    return li;
  });
  $("conversations").replaceChildren(...items);
}

// -- messages --------------------------------------------------------------------------------

function part(parent, tag, cls) {
  let node = parent.querySelector(":scope > ." + cls);
  if (!node) {
    node = document.createElement(tag);
    node.className = cls;
    parent.append(node);
  }
  return node;
}

// Fill (or refresh, while it streams) a message's element. Parts are updated in place, so an
// opened reasoning block stays open as text arrives.
function fill(node, m) {
  if (m.role === "user") {
    part(node, "div", "content").textContent = m.content;
  } else if (m.role === "tool") {
    const box = part(node, "details", "tool-result");
    part(box, "summary", "title").textContent = `${m.name} returned`;
    part(box, "pre", "output").textContent = m.content;
  } else {
    if (m.reasoning) {
      const box = part(node, "details", "reasoning");
      const thinking = !(m.content || m.tool_calls || m.finish_reason || m.stopped || m.error);
      part(box, "summary", "title").textContent = thinking ? "Thinking…" : "Reasoning";
      part(box, "div", "text").textContent = m.reasoning;
    }
    for (const [i, call] of (m.tool_calls || []).entries()) {
      const box = part(node, "div", "tool-call-" + i);
      box.classList.add("tool-call");
      part(box, "span", "name").textContent = `Calls ${call.function.name}`;
      part(box, "pre", "arguments").textContent = call.function.arguments;
    }
    if (m.content) part(node, "div", "content").replaceChildren(window.renderMarkdown(m.content));
    if (m.stopped) part(node, "div", "note").textContent = "Stopped.";
    if (m.finish_reason === "length") part(node, "div", "note").textContent = "Cut short: the context is full.";
    if (m.error) part(node, "div", "error").textContent = m.error;
  }
}

function messageElement(m) {
  const node = document.createElement("div");
  node.className = "msg " + m.role;
  fill(node, m);
  return node;
}

function scrollDown(force) {
  const box = $("messages");
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
}

function renderMessages() {
  const c = current();
  const nodes = c ? c.messages.map(messageElement) : [];
  $("messages").replaceChildren(...(nodes.length ? nodes : [emptyNote()]));
  scrollDown(true);
}

function emptyNote() {
  const p = document.createElement("p");
  p.id = "empty";
  p.textContent = "Ask something. Replies stream in; the model's reasoning is folded above each answer.";
  return p;
}

function append(m) {
  $("empty")?.remove();
  const node = messageElement(m);
  $("messages").append(node);
  scrollDown(true);
  return node;
}

// -- generating ------------------------------------------------------------------------------

// A stored message as the API takes it. Replies that failed or were stopped before an answer
// or a call are left out: the model would read nothing in them (earlier reasoning is dropped).
function forAPI(m) {
  if (m.role === "user") return {role: "user", content: m.content};
  if (m.role === "tool") return {role: "tool", tool_call_id: m.tool_call_id, content: m.content};
  if (!m.content && !m.tool_calls) return null;
  const out = {role: "assistant", content: m.content || null};
  if (m.reasoning) out.reasoning = m.reasoning;
  if (m.tool_calls) out.tool_calls = m.tool_calls;
  return out;
}

function applyChunk(reply, chunk) {
  if (chunk.error) throw new Error(chunk.error.message);
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  const d = choice.delta || {};
  // The server sends the reasoning under both names (reasoning, reasoning_content): take one.
  const reasoning = d.reasoning ?? d.reasoning_content;
  if (reasoning) reply.reasoning = (reply.reasoning || "") + reasoning;
  if (d.content) reply.content += d.content;
  for (const tc of d.tool_calls || []) {
    reply.tool_calls ||= [];
    const call = reply.tool_calls[tc.index] ||= {id: "", type: "function",
                                                 function: {name: "", arguments: ""}};
    if (tc.id) call.id = tc.id;
    if (tc.function?.name) call.function.name += tc.function.name;
    if (tc.function?.arguments) call.function.arguments += tc.function.arguments;
  }
  if (choice.finish_reason) reply.finish_reason = choice.finish_reason;
}

// Stream one assistant reply into `reply`, refreshing `node` at most once a frame.
async function streamReply(conversation, reply, node, signal) {
  const body = {model: settings.model, stream: true, reasoning_effort: settings.effort,
                temperature: settings.temperature,
                messages: conversation.messages.filter((m) => m !== reply).map(forAPI).filter(Boolean)};
  if (settings.tools) {
    demoTools ||= await (await request("demo/tools")).json();
    body.tools = demoTools;
  }
  const res = await request("v1/chat/completions", {method: "POST", body: JSON.stringify(body), signal});
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let frame = 0;
  const refresh = () => {
    frame = 0;
    fill(node, reply);
    scrollDown();
  };
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          applyChunk(reply, JSON.parse(data));
        }
        frame ||= requestAnimationFrame(refresh);
      }
    }
  } finally {
    cancelAnimationFrame(frame);
    refresh();
  }
}

async function runDemoTool(call, signal) {
  const res = await request("demo/tools/" + encodeURIComponent(call.function.name),
                            {method: "POST", body: call.function.arguments, signal});
  return (await res.json()).output;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "busy" : "idle";
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  let conversation = current();
  if (!conversation) {
    conversation = {id: Date.now().toString(36) + Math.random().toString(36).slice(2),
                    title: text.slice(0, 60), messages: []};
    conversations.unshift(conversation);
    currentId = conversation.id;
  }
  const user = {role: "user", content: text};
  conversation.messages.push(user);
  append(user);
  save();
  renderList();
  running = new AbortController();
  setBusy(true);
  let reply = null;
  let node = null;
  try {
    for (let round = 0; round < MAX_TOOL_ROUNDS; round++) {
      reply = {role: "assistant", content: "", reasoning: ""};
      conversation.messages.push(reply);
      node = append(reply);
      await streamReply(conversation, reply, node, running.signal);
      save();
      if (!reply.tool_calls || !settings.tools) break;
      for (const call of reply.tool_calls) {
        const result = {role: "tool", tool_call_id: call.id, name: call.function.name,
                        content: await runDemoTool(call, running.signal)};
        conversation.messages.push(result);
        append(result);
        save();
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = e.message;
    if (e.status === 401) askForKey();
    fill(node, reply);
  } finally {
    running = null;
    setBusy(false);
    save();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || running || document.body.dataset.state === "loading") return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running?.abort());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && running) running.abort();
});
$("new-chat").addEventListener("click", () => select(null));

bindSettings();
$("key-button").hidden = !store.get("apiKey", "");
renderList();
renderMessages();
loadModels();
