// The live avatar page: one WebSocket /v1/converse session (protocol in docs/clients.md).
// Speech in: a file decoded and resampled here, or the microphone through pcm-worklet.js, both
// sent as 16 kHz PCM s16le at real-time pace. Video out: fragmented MP4 into Media Source
// Extensions (ManagedMediaSource where MediaSource is missing, as on iOS Safari), or WebRTC
// through the WHEP client (window.avatarWhep) when that is loaded. Plain JS, no framework.
"use strict";

const RATE = 16000;          // Hz of the PCM sent
const CHUNK_S = 0.1;         // seconds of speech per WebSocket message
const LIVE_EDGE_S = 1.5;     // a video further behind its buffered end than this jumps forward

const $ = (id) => document.getElementById(id);
const page = {               // what the page knows, also read by tests (window.avatarPage)
  state: "idle", sessionId: null, header: null, fragments: 0, latenciesMs: [], events: [], error: null,
};
window.avatarPage = page;

let ws = null, feeder = null, mic = null, media = null, sent = [], sentS = 0;
let ended = false;  // "end" sent: nothing may follow it (the server closes with 4400 otherwise)

function setState(s) { page.state = s; $("state").textContent = s; }

function log(text) {
  page.events.push(text);
  const box = $("events");
  box.textContent += `${new Date().toISOString().slice(11, 23)} ${text}\n`;
  box.scrollTop = box.scrollHeight;
}

function percentile(values, p) {
  const v = [...values].sort((a, b) => a - b);
  return v.length ? v[Math.min(v.length - 1, Math.floor(p * v.length))] : NaN;
}

function showLatency() {
  const l = page.latenciesMs;
  $("latency").textContent = l.length
    ? `last ${l[l.length - 1].toFixed(0)} ms, p50 ${percentile(l, 0.5).toFixed(0)} ms, p95 ${percentile(l, 0.95).toFixed(0)} ms (${l.length} blocks)`
    : "-";
}

// --- inputs --------------------------------------------------------------------------------

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function portraitBytes() {
  const file = $("portrait").files[0];
  if (file) return file.arrayBuffer();
  const res = await fetch("static/portrait.jpg");
  return res.arrayBuffer();
}

function toPcm16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = Math.max(-1, Math.min(1, samples[i])) * 0x7fff;
  return out;
}

// A speech file -> 16 kHz mono PCM16 (the browser decodes; OfflineAudioContext resamples and mixes down).
async function decodeSpeech(file) {
  const data = await file.arrayBuffer();
  const decoded = await new AudioContext().decodeAudioData(data);
  const offline = new OfflineAudioContext(1, Math.ceil(decoded.duration * RATE), RATE);
  const src = offline.createBufferSource();
  src.buffer = decoded;
  src.connect(offline.destination);
  src.start();
  return toPcm16((await offline.startRendering()).getChannelData(0));
}

// --- sending -------------------------------------------------------------------------------

function sendPcm(pcm) {
  if (!ws || ws.readyState !== WebSocket.OPEN || ended) return;
  ws.send(pcm.buffer.slice(pcm.byteOffset, pcm.byteOffset + pcm.byteLength));
  const seconds = pcm.length / RATE;
  sent.push({ start: sentS, end: sentS + seconds, at: performance.now() });
  sentS += seconds;
}

function sendControl(type) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type }));
}

// Feeds PCM at real-time pace: each chunk leaves once a speaker would have said it.
function feedFile(pcm) {
  const n = Math.round(CHUNK_S * RATE);
  const t0 = performance.now();
  let at = 0;
  let stopped = false;
  const step = () => {
    if (stopped) return;
    if (at >= pcm.length) { sendControl("end_of_utterance"); log("speech file sent"); return; }
    const piece = pcm.subarray(at, at + n);
    at += piece.length;
    sendPcm(piece);
    setTimeout(step, Math.max(0, t0 + (at / RATE) * 1000 - performance.now()));
  };
  step();
  return { file: true, stop() { stopped = true; } };
}

async function startMic() {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("static/pcm-worklet.js");
  const node = new AudioWorkletNode(ctx, "pcm16-resampler", { processorOptions: { targetRate: RATE, chunkS: 0.02 } });
  node.port.onmessage = (e) => sendPcm(new Int16Array(e.data));
  ctx.createMediaStreamSource(stream).connect(node);
  node.connect(ctx.destination);  // a node nothing pulls is never run; its output is silence
  await ctx.resume();
  log(`microphone on (${ctx.sampleRate} Hz, resampled to ${RATE} Hz in an AudioWorklet)`);
  // the worklet's chunks already posted still arrive after stop(): drop them at the port
  return { stop() { node.port.onmessage = null; node.port.close(); stream.getTracks().forEach((t) => t.stop()); ctx.close(); } };
}

// --- watching ------------------------------------------------------------------------------

// fMP4 into MSE: appends queue up while the SourceBuffer is busy.
function mseSink(video, mimeType) {
  const MS = window.MediaSource || window.ManagedMediaSource;
  if (!MS) throw new Error("this browser has neither MediaSource nor ManagedMediaSource");
  if (!MS.isTypeSupported(mimeType)) throw new Error(`this browser cannot play ${mimeType}`);
  const source = new MS();
  const queue = [];
  let buffer = null;
  video.disableRemotePlayback = true;  // ManagedMediaSource needs it (or an AirPlay alternative)
  video.src = URL.createObjectURL(source);
  const pump = () => {
    if (!buffer || buffer.updating || !queue.length) return;
    buffer.appendBuffer(queue.shift());
  };
  source.addEventListener("sourceopen", () => {
    buffer = source.addSourceBuffer(mimeType);
    buffer.mode = "segments";
    buffer.addEventListener("updateend", () => {
      const b = video.buffered;
      if (b.length && b.end(b.length - 1) - video.currentTime > LIVE_EDGE_S) video.currentTime = b.end(b.length - 1) - 0.3;
      if (video.paused && b.length) video.play().catch((e) => log(`play: ${e.message}`));
      pump();
    });
    pump();
  }, { once: true });
  return {
    append(data) { queue.push(data); pump(); },
    end() { if (source.readyState === "open" && !buffer?.updating) try { source.endOfStream(); } catch (e) {} },
  };
}

function transport() { return document.querySelector("input[name=transport]:checked").value; }

function setupWebrtcSwitch() {
  const ok = typeof window.avatarWhep?.watch === "function";
  $("transport-webrtc").disabled = !ok;
  $("webrtc-note").textContent = ok ? "" : "WebRTC is not available on this server (its WHEP client is not loaded).";
}

// --- the session ---------------------------------------------------------------------------

function wsUrl() {
  const url = new URL("v1/converse", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

async function start() {
  page.error = null; page.fragments = 0; page.latenciesMs = []; page.events = []; sent = []; sentS = 0; ended = false;
  $("events").textContent = ""; $("fragments").textContent = "0"; showLatency();
  const source = document.querySelector("input[name=source]:checked").value;
  let pcm = null;
  if (source === "file") {
    const file = $("speech").files[0];
    if (!file) { log("choose a speech file first"); return; }
    setState("decoding speech");
    pcm = await decodeSpeech(file);
    log(`speech: ${(pcm.length / RATE).toFixed(2)} s at ${RATE} Hz`);
  }
  const header = {
    image: base64(await portraitBytes()),
    prompt: $("prompt").value,
    preset: $("preset").value,
    size: $("size").value.trim(),
    sample_steps: Number($("steps").value) || 0,
    sample_rate: RATE,
    allow_degrade: $("degrade").checked,
  };
  const token = $("token").value.trim();
  setState("connecting");
  $("start").disabled = true;
  ws = new WebSocket(wsUrl(), ["avatar.v1", ...(token ? [`bearer.${token}`] : [])]);
  ws.binaryType = "arraybuffer";
  let announced = null;   // the JSON message whose binary comes next
  ws.onopen = () => { ws.send(JSON.stringify(header)); setState("starting"); };
  ws.onmessage = async (e) => {
    if (typeof e.data !== "string") {
      const what = announced; announced = null;
      if (what?.type === "header") media?.append(e.data);
      else if (what?.type === "fragment") onFragment(what, e.data);
      return;
    }
    const msg = JSON.parse(e.data);
    if (msg.bytes !== undefined) announced = msg;
    if (msg.type === "header") await onHeader(msg, pcm);
    else if (msg.type === "status") {
      log(`status: ${msg.reason}, ${msg.blocks} blocks; server audio->fragment p50 ${msg.audio_to_fragment.p50_ms.toFixed(0)} ms`);
      page.status = msg;
    } else if (msg.type === "error") {
      page.error = msg; log(`error ${msg.status} ${msg.code}: ${msg.error}`);
    } else if (msg.type !== "fragment") {
      log(`${msg.type} ${JSON.stringify(Object.fromEntries(Object.entries(msg).filter(([k]) => k !== "type")))}`);
    }
  };
  ws.onclose = (e) => {
    log(`closed ${e.code}${e.reason ? ": " + e.reason : ""}`);
    setState(page.error ? `ended: ${page.error.code}` : "ended");
    stopSources(); media?.end();
    $("start").disabled = false; $("interrupt").disabled = true; $("stop").disabled = true;
    ws = null;
  };
}

async function onHeader(msg, pcm) {
  page.header = msg; page.sessionId = msg.session_id;
  $("session").textContent = `${msg.session_id} (${msg.width}x${msg.height}, ${msg.fps} fps, ${msg.sample_steps} steps, ${msg.model})`;
  log(`header: ${msg.mime_type}, block ${msg.block_s} s, generator ${msg.measured_block_ms.toFixed(0)} of ${msg.block_budget_ms.toFixed(0)} ms per block`);
  const video = $("video");
  if (transport() === "webrtc") {
    media = null;
    page.whep = await window.avatarWhep.watch(msg.session_id, video, new URL(".", location.href).href, $("token").value.trim() || undefined);
    $("live-via").textContent = "WebRTC (WHEP)";
  } else {
    media = mseSink(video, msg.mime_type);
    $("live-via").textContent = window.MediaSource ? "MSE" : "ManagedMediaSource";
  }
  setState("live");
  $("interrupt").disabled = false; $("stop").disabled = false;
  feeder = pcm ? feedFile(pcm) : await startMic().catch((e) => { log(`microphone: ${e.message}`); return null; });
}

function onFragment(msg, data) {
  page.fragments += 1;
  $("fragments").textContent = String(page.fragments);
  media?.append(data);
  if (!msg.idle && msg.audio_end_s > msg.audio_start_s) {
    // the chunk that held the fragment's first sample: when it left this page
    const chunk = sent.find((c) => c.end > msg.audio_start_s + 1e-6);
    if (chunk) { page.latenciesMs.push(performance.now() - chunk.at); showLatency(); }
  }
}

function stopSources() { feeder?.stop(); feeder = null; }

$("start").onclick = () => start().catch((e) => { log(`error: ${e.message}`); setState("error"); $("start").disabled = false; });
// Barge-in: the file stops (its speaker was cut off); the microphone stays open.
$("interrupt").onclick = () => { if (feeder?.file) stopSources(); sendControl("interrupt"); log("interrupt sent"); };
$("stop").onclick = () => { stopSources(); sendControl("end"); ended = true; log("end sent"); };
$("portrait").onchange = () => { const f = $("portrait").files[0]; if (f) $("portrait-preview").src = URL.createObjectURL(f); };
$("token").value = new URLSearchParams(location.search).get("token") || "";
setupWebrtcSwitch();
window.addEventListener("avatar-whep-ready", setupWebrtcSwitch);  // a WHEP client loaded later
