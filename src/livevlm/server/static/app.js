// The page of `livevlm serve`: capture → canvas → JPEG → WebSocket /v1/stream, and the server's events →
// caption, conversation, p(speak) strip, status. Plain ES2020 in one file: no bundler, no CDN, works offline.
//
// Protocol (docs/server.md): the client sends {"type": "start", …}, then per frame a {"type": "frame",
// "time_s"} text message followed by the JPEG as a binary message, {"type": "query", "text"} at any time and
// {"type": "end"}; the server answers ready, frame (p_speak), delta, response, query, dropped, error and,
// after end, summary.
"use strict";

const MAX_SIDE = 384;             // long side of a sent frame: the server letterboxes anyway; small JPEGs keep bandwidth low
const JPEG_QUALITY = 0.85;
const MAX_BUFFERED = 512 * 1024;  // bytes waiting in the socket (~15 frames) before frames are skipped here
const STRIP_SECONDS = 60;         // the p(speak) strip shows the last minute
const CAPTION_HOLD_MS = 4000;     // a caption fades this long after its last word
const SUMMARY_TIMEOUT_MS = 30000; // after Stop, how long to wait for the summary before closing anyway

// Close codes a server uses to refuse a session, in plain words.
const CLOSE_REASONS = {
  1008: "The server refused the connection: the API key is missing or wrong (close code 1008). " +
        "Enter the key in the API key field, or open the page as /?key=YOUR_KEY.",
  1013: "The server is busy: the maximum number of sessions is reached (close code 1013). Try again later.",
};

const $ = (id) => document.getElementById(id);
const ui = {
  setup: $("setup"), fileInput: $("file-input"), query: $("query-input"), threshold: $("threshold-input"),
  key: $("key-input"), start: $("start-button"), stop: $("stop-button"), notice: $("notice"),
  video: $("video"), caption: $("caption"), idleHint: $("idle-hint"), strip: $("pspeak-canvas"),
  conversation: $("conversation"), askForm: $("ask-form"), ask: $("ask-input"), askButton: $("ask-button"),
  summary: $("summary"), summaryList: $("summary-list"),
  connection: $("status-connection"), session: $("status-session"), fps: $("status-fps"),
  thresholdShown: $("status-threshold"), sent: $("status-sent"), processed: $("status-processed"),
  dropped: $("status-dropped"), skipped: $("status-skipped"), errors: $("status-errors"),
};
const frameCanvas = document.createElement("canvas"); // off-screen: where frames are scaled and encoded

// One session's state. Replaced on every Start; the strip and the conversation keep showing the last one.
let s = newState();

function newState() {
  return {
    ws: null, media: null, fileUrl: null, isFile: false,
    running: false,   // frames are being sent
    stopping: false,  // Stop pressed (or the file ended): `end` sent, waiting for the summary
    summarized: false,
    fps: null, threshold: null, sessionId: null,
    timer: null, summaryTimer: null, t0: 0, lastTime: -1, encoding: false,
    sent: 0, processed: 0, dropped: 0, skipped: 0, errors: 0,
    points: [],       // {t, p}: p(speak) per processed frame
    marks: [],        // {t, kind: "response" | "query"}
    pending: [],      // <li> of queries sent but not yet echoed by the server (which gives their stream time)
    partial: "",      // the caption while a response is being decoded
  };
}

// --- formatting ---------------------------------------------------------------------------------------

/** Stream time in seconds → "mm:ss.s". */
function clock(seconds) {
  const t = Math.max(0, seconds);
  const minutes = Math.floor(t / 60);
  const rest = (t - 60 * minutes).toFixed(1).padStart(4, "0");
  return `${String(minutes).padStart(2, "0")}:${rest}`;
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

function renderStatus(connection) {
  if (connection !== undefined) ui.connection.textContent = connection;
  ui.session.textContent = s.sessionId || "–";
  ui.fps.textContent = s.fps === null ? "–" : String(s.fps);
  ui.thresholdShown.textContent = s.threshold === null ? "–" : String(s.threshold);
  ui.sent.textContent = s.sent;
  ui.processed.textContent = s.processed;
  ui.dropped.textContent = s.dropped;
  ui.skipped.textContent = s.skipped;
  ui.errors.textContent = s.errors;
}

// --- sources ------------------------------------------------------------------------------------------

/** Open the chosen source in the <video> element. Files start paused: they play once the server is ready,
 *  so that stream time 0 is the file's first frame. */
async function openSource(kind) {
  const video = ui.video;
  if (kind === "file") {
    const file = ui.fileInput.files[0];
    if (!file) throw new Error("Choose a video file first.");
    s.isFile = true;
    s.fileUrl = URL.createObjectURL(file);
    video.srcObject = null;
    video.src = s.fileUrl;
    video.load();
    return;
  }
  if (!navigator.mediaDevices) {
    // Browsers expose cameras and screen capture only on secure origins (https, or http://localhost).
    throw new Error("This browser allows the camera and screen capture only on https or http://localhost " +
                    `pages (this one is ${location.origin}). Use a file, or reach the server through localhost ` +
                    "(e.g. an SSH tunnel).");
  }
  s.media = kind === "screen"
    ? await navigator.mediaDevices.getDisplayMedia({video: true, audio: false})
    : await navigator.mediaDevices.getUserMedia({video: true, audio: false});
  // Ending the share from the browser's own bar (or unplugging the camera) stops the session cleanly.
  s.media.getVideoTracks().forEach((track) => track.addEventListener("ended", stop));
  video.removeAttribute("src");
  video.srcObject = s.media;
  await video.play();
}

function closeSource() {
  if (s.media) s.media.getTracks().forEach((track) => track.stop());
  ui.video.pause();
  if (s.fileUrl) URL.revokeObjectURL(s.fileUrl);
  s.media = null;
  s.fileUrl = null;
}

// --- the connection -----------------------------------------------------------------------------------

function streamUrl(key) {
  // Relative to the page, so that the page also works behind a reverse proxy under a path prefix.
  const url = new URL("v1/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (key) url.searchParams.set("key", key);
  return url.href;
}

function startMessage() {
  const message = {type: "start"};
  const query = ui.query.value.trim();
  if (query) message.query = query;
  const theta = ui.threshold.value.trim();
  if (theta) message.threshold = Number(theta); // empty = the model's recommended θ
  return message;
}

async function start(event) {
  event.preventDefault();
  if (s.ws) return;
  const theta = ui.threshold.value.trim();
  if (theta && !(Number(theta) >= 0 && Number(theta) <= 1)) {
    showNotice(`θ must be a number in [0, 1] (got "${theta}"); leave it empty for the model's own.`);
    return;
  }
  resetView();
  const kind = new FormData(ui.setup).get("source");
  setControls(true);
  try {
    await openSource(kind);
  } catch (error) {
    showNotice(`Could not open the ${kind}: ${error.message || error.name}`);
    closeSource();
    setControls(false);
    return;
  }
  ui.idleHint.hidden = true;
  connect();
}

function connect() {
  const ws = new WebSocket(streamUrl(ui.key.value.trim()));
  s.ws = ws;
  let opened = false;
  renderStatus("connecting…");
  ws.addEventListener("open", () => {
    opened = true;
    const message = startMessage();
    ws.send(JSON.stringify(message));
    if (message.query) addPendingQuery(message.query);
    renderStatus("connected, waiting for the model…");
  });
  ws.addEventListener("message", onMessage);
  ws.addEventListener("close", (event) => onClose(event, opened));
}

function onClose(event, opened) {
  const refusal = CLOSE_REASONS[event.code];
  if (refusal) {
    showNotice(refusal);
  } else if (!opened && !s.stopping) { // (Stop pressed while connecting closes it on purpose)
    // A refusal during the handshake (before the socket opened) reaches the page as 1006, without a reason.
    showNotice(`Could not connect to ${streamUrl("").replace(/\?.*$/, "")}: the server is unreachable or ` +
               "refused the connection (a wrong API key or a full server look the same here).");
  } else if (!s.summarized && event.code !== 1000) {
    showNotice(`The connection closed (code ${event.code}${event.reason ? ": " + event.reason : ""}).`);
  }
  finish(s.summarized ? "finished" : "disconnected");
}

/** Back to idle: no timer, no capture, no socket. The strip, conversation and summary stay on screen. */
function finish(connection) {
  clearInterval(s.timer);
  clearTimeout(s.summaryTimer);
  closeSource();
  s.running = false;
  s.stopping = false;
  s.ws = null;
  setControls(false);
  renderStatus(connection);
}

function stop() {
  if (!s.ws || s.stopping) return;
  s.stopping = true;
  s.running = false;
  clearInterval(s.timer);
  closeSource();
  ui.stop.disabled = true;
  setAsk(false);
  if (s.ws.readyState === WebSocket.OPEN) {
    s.ws.send(JSON.stringify({type: "end"}));
    renderStatus("ending — waiting for the summary…");
    // The server finishes the frames it holds first; don't wait forever if it never answers.
    s.summaryTimer = setTimeout(() => s.ws && s.ws.close(1000), SUMMARY_TIMEOUT_MS);
  } else if (s.ws.readyState === WebSocket.CONNECTING) {
    s.ws.close();
  }
}

function setControls(active) {
  ui.start.disabled = active;
  ui.stop.disabled = !active;
  ui.setup.querySelectorAll("input").forEach((input) => { input.disabled = active; });
  if (!active) setAsk(false);
}

function setAsk(enabled) {
  ui.ask.disabled = !enabled;
  ui.askButton.disabled = !enabled;
}

// --- frames -------------------------------------------------------------------------------------------

/** Stream time of the frame about to be sent: the file's own clock, or the wall clock since `ready`. */
function frameTime() {
  return s.isFile ? ui.video.currentTime : (performance.now() - s.t0) / 1000;
}

function sendFrame() {
  const video = ui.video;
  if (!s.running || video.readyState < 2 || !video.videoWidth) return;
  const t = frameTime();
  if (t <= s.lastTime) return; // a paused or stalled file: nothing new to show
  if (s.encoding || s.ws.bufferedAmount > MAX_BUFFERED) {
    // The network (or the encoder) is behind: sending more would only grow the lag, so skip this frame.
    s.skipped += 1;
    renderStatus();
    return;
  }
  const scale = Math.min(1, MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
  frameCanvas.width = Math.round(video.videoWidth * scale);
  frameCanvas.height = Math.round(video.videoHeight * scale);
  frameCanvas.getContext("2d").drawImage(video, 0, 0, frameCanvas.width, frameCanvas.height);
  s.lastTime = t;
  s.encoding = true;
  const ws = s.ws;
  frameCanvas.toBlob((blob) => {
    s.encoding = false;
    if (!blob || !s.running || ws.readyState !== WebSocket.OPEN) return;
    // The time and the image go out back to back, so the server pairs them.
    ws.send(JSON.stringify({type: "frame", time_s: Math.round(t * 1000) / 1000}));
    ws.send(blob);
    s.sent += 1;
    renderStatus();
  }, "image/jpeg", JPEG_QUALITY);
}

// --- server events ------------------------------------------------------------------------------------

const HANDLERS = {
  ready(msg) {
    s.sessionId = msg.session || null;
    s.fps = msg.fps;
    s.threshold = msg.threshold;
    s.running = true;
    s.t0 = performance.now();
    s.timer = setInterval(sendFrame, 1000 / msg.fps);
    if (s.isFile) {
      ui.video.addEventListener("ended", stop, {once: true});
      ui.video.play().catch((error) => showNotice(`Could not play the file: ${error.message}`));
    }
    if (msg.limits && msg.limits.max_query_chars) ui.ask.maxLength = msg.limits.max_query_chars; // refused above
    setAsk(true);
    ui.ask.focus();
    renderStatus("connected");
    drawStrip();
  },
  frame(msg) {
    s.processed += 1;
    s.points.push({t: msg.time_s, p: msg.p_speak});
    // Keep a little more than the strip shows, so memory stays bounded on long sessions.
    const oldest = msg.time_s - 2 * STRIP_SECONDS;
    while (s.points.length && s.points[0].t < oldest) s.points.shift();
    while (s.marks.length && s.marks[0].t < oldest) s.marks.shift();
    renderStatus();
    scheduleStripDraw();
  },
  delta(msg) {
    s.partial += msg.text;
    showCaption(s.partial, true);
  },
  response(msg) {
    s.partial = "";
    showCaption(msg.text, false);
    addTurn("assistant", msg.time_s, msg.text, msg.latency_s);
    s.marks.push({t: msg.time_s, kind: "response"});
    scheduleStripDraw();
  },
  query(msg) {
    // The server takes queries in the order they were sent: this echo is the oldest one waiting.
    const pending = s.pending.shift();
    if (pending) confirmTurn(pending, msg.time_s, msg.text);
    else addTurn("user", msg.time_s, msg.text);
    s.marks.push({t: msg.time_s, kind: "query"});
    scheduleStripDraw();
  },
  note() {
    // The model's note to itself (a model that notes each event while a reminder is pending): never shown.
  },
  dropped(msg) {
    s.dropped += msg.count || 0;
    renderStatus();
  },
  error(msg) {
    s.errors += 1;
    showNotice(`Server error: ${msg.message}`);
    renderStatus();
  },
  summary(msg) {
    s.summarized = true;
    showSummary(msg);
    if (s.ws) s.ws.close(1000);
  },
};

function onMessage(event) {
  if (typeof event.data !== "string") return; // the server sends text only
  let msg;
  try {
    msg = JSON.parse(event.data);
  } catch (error) {
    return;
  }
  const handler = HANDLERS[msg.type];
  if (handler) handler(msg);
}

// --- caption, conversation, summary -------------------------------------------------------------------

let captionTimer = null;

function showCaption(text, streaming) {
  ui.caption.textContent = text;
  ui.caption.classList.toggle("streaming", streaming);
  ui.caption.classList.add("visible");
  clearTimeout(captionTimer);
  captionTimer = setTimeout(() => ui.caption.classList.remove("visible"), CAPTION_HOLD_MS);
}

function addTurn(role, timeS, text, latencyS) {
  const item = document.createElement("li");
  item.className = `turn ${role}`;
  const head = document.createElement("div");
  head.className = "head";
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = timeS === null ? "…" : clock(timeS);
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  head.append(time, who);
  if (typeof latencyS === "number") {
    const latency = document.createElement("span");
    latency.className = "latency";
    latency.textContent = `${latencyS.toFixed(2)} s`;
    latency.title = "time the model took to say it";
    head.append(latency);
  }
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text;
  item.append(head, body);
  // Queries still waiting for the server's echo stay last: what the server reports comes before them.
  ui.conversation.insertBefore(item, s.pending[0] || null);
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
  return item;
}

/** A query shows at once, greyed; the server's echo gives it its stream time. */
function addPendingQuery(text) {
  const item = addTurn("user", null, text);
  ui.conversation.append(item); // after the queries already waiting
  item.classList.add("pending");
  s.pending.push(item);
}

function confirmTurn(item, timeS, text) {
  item.classList.remove("pending");
  item.querySelector(".time").textContent = clock(timeS);
  item.querySelector(".text").textContent = text; // as the model got it
}

function ask(event) {
  event.preventDefault();
  const text = ui.ask.value.trim();
  if (!text || !s.ws || s.ws.readyState !== WebSocket.OPEN || s.stopping) return;
  s.ws.send(JSON.stringify({type: "query", text}));
  addPendingQuery(text);
  ui.ask.value = "";
}

function showSummary(msg) {
  ui.summaryList.replaceChildren();
  for (const [key, value] of Object.entries(msg)) {
    if (key === "type") continue;
    const term = document.createElement("dt");
    term.textContent = key;
    const data = document.createElement("dd");
    data.textContent = typeof value === "number" && !Number.isInteger(value) ? value.toFixed(3) : String(value);
    ui.summaryList.append(term, data);
  }
  ui.summary.hidden = false;
}

function resetView() {
  s = newState();
  ui.conversation.replaceChildren();
  ui.summary.hidden = true;
  ui.caption.classList.remove("visible");
  showNotice("");
  renderStatus("not connected");
  drawStrip();
}

// --- the p(speak) strip -------------------------------------------------------------------------------

const COLORS = {line: "#1b2733", threshold: "#d9480f", response: "#2b8a3e", query: "#1c6fd1",
                grid: "#e3e7ec", text: "#5b6673"};
let stripQueued = false;

function scheduleStripDraw() {
  // Many frame events can arrive within one display frame; draw once per animation frame.
  if (stripQueued) return;
  stripQueued = true;
  requestAnimationFrame(() => {
    stripQueued = false;
    drawStrip();
  });
}

function drawStrip() {
  const canvas = ui.strip;
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const box = {left: 34, right: width - 18, top: 10, bottom: height - 20}; // room for the labels
  const last = s.points.length ? s.points[s.points.length - 1].t : 0;
  const t1 = Math.max(STRIP_SECONDS, last);
  const t0 = t1 - STRIP_SECONDS;
  const x = (t) => box.left + (t - t0) / STRIP_SECONDS * (box.right - box.left);
  const y = (p) => box.bottom - p * (box.bottom - box.top);
  drawAxes(ctx, box, t0, t1, x, y);
  if (s.threshold !== null) {
    ctx.strokeStyle = COLORS.threshold;
    ctx.lineWidth = 1.5;
    ctx.setLineDash([6, 4]);
    line(ctx, box.left, y(1 - s.threshold), box.right, y(1 - s.threshold));
    ctx.setLineDash([]);
    ctx.fillStyle = COLORS.threshold;
    ctx.textAlign = "right";
    ctx.fillText(`1 − θ = ${(1 - s.threshold).toFixed(3)}`, box.right - 4, y(1 - s.threshold) - 4);
  }
  canvas.dataset.points = s.points.length; // for tests and the curious: how many frames the strip holds
  ctx.strokeStyle = COLORS.line;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  s.points.filter((point) => point.t >= t0).forEach((point, i) => {
    if (i === 0) ctx.moveTo(x(point.t), y(point.p));
    else ctx.lineTo(x(point.t), y(point.p));
  });
  ctx.stroke();
  drawMarks(ctx, box, t0, x);
}

/** A vertical line at each response (green, a dot on top) and query (blue, a triangle on top), over the curve
 *  so that a response's line stays visible on the spike that caused it. Queries come last: an answer comes at
 *  its query's time and would hide it. */
function drawMarks(ctx, box, t0, x) {
  ctx.globalAlpha = 0.75;
  for (const kind of ["response", "query"]) {
    ctx.strokeStyle = ctx.fillStyle = COLORS[kind];
    ctx.lineWidth = kind === "query" ? 2 : 1.5;
    for (const mark of s.marks) {
      if (mark.kind !== kind || mark.t < t0) continue;
      line(ctx, x(mark.t), box.top, x(mark.t), box.bottom);
      if (kind === "query") triangle(ctx, x(mark.t), box.top);
      else dot(ctx, x(mark.t), box.top - 2);
    }
  }
  ctx.globalAlpha = 1;
}

function dot(ctx, xCentre, yCentre) {
  ctx.beginPath();
  ctx.arc(xCentre, yCentre, 3.5, 0, 2 * Math.PI);
  ctx.fill();
}

function drawAxes(ctx, box, t0, t1, x, y) {
  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  ctx.textBaseline = "middle";
  for (const p of [0, 0.5, 1]) {
    ctx.strokeStyle = COLORS.grid;
    line(ctx, box.left, y(p), box.right, y(p));
    ctx.fillStyle = COLORS.text;
    ctx.textAlign = "right";
    ctx.fillText(String(p), box.left - 6, y(p));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let t = Math.ceil(t0 / 10) * 10; t <= t1; t += 10) {
    ctx.fillText(clock(t).slice(0, 5), x(t), box.bottom + 5);
  }
  ctx.textBaseline = "alphabetic";
}

/** A small downward triangle at the top of a query's line, so that queries stand out among responses. */
function triangle(ctx, xTop, yTop) {
  ctx.beginPath();
  ctx.moveTo(xTop - 5, yTop - 6);
  ctx.lineTo(xTop + 5, yTop - 6);
  ctx.lineTo(xTop, yTop + 2);
  ctx.fill();
}

function line(ctx, x0, y0, x1, y1) {
  ctx.beginPath();
  ctx.moveTo(x0, y0);
  ctx.lineTo(x1, y1);
  ctx.stroke();
}

// --- wiring -------------------------------------------------------------------------------------------

// A key in the page's own URL (/?key=…) fills the key field, so a link can carry it.
ui.key.value = new URLSearchParams(location.search).get("key") || "";
// Choosing a file selects the File source.
ui.fileInput.addEventListener("change", () => { $("source-file").checked = true; });
ui.setup.addEventListener("submit", start);
ui.stop.addEventListener("click", stop);
ui.askForm.addEventListener("submit", ask); // Enter in the box submits the form
window.addEventListener("resize", scheduleStripDraw);
renderStatus();
drawStrip();
