"use strict";
// peerd operator dashboard: polls /ui/api/summary and renders it. No framework, no build step.
// Text from the node (titles, peer ids, errors) is only ever set as textContent.

const REFRESH_MS = 5000;
const SOURCES = ["local", "lan", "libp2p", "r2"];
const SVG_NS = "http://www.w3.org/2000/svg";
let renders = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

function fmtPct(x) { return x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`; }

function fillList(id, pairs) {
  const dl = document.getElementById(id);
  dl.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function fillTable(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows.map((cells) => el("tr", {}, ...cells.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c))))));
}

function sectionError(section) {
  return section && typeof section === "object" && !Array.isArray(section) && typeof section.error === "string"
    ? section.error : null;
}

function renderNode(s) {
  const n = s.node;
  document.getElementById("node-name").textContent = n.name;
  document.getElementById("peer-id").textContent = n.peer_id;
  const status = document.getElementById("status");
  const [text, cls] = n.draining ? ["draining", "warn"] : n.ready ? ["ready", "ok"] : ["starting", "warn"];
  status.textContent = text;
  status.className = `pill ${cls}`;
  fillList("health-list", [
    ["Version", n.version],
    ["Up", fmtDuration(n.uptime_s)],
    ["Public URL", n.public_url || "not set"],
    ["Peer id", el("span", { class: "mono" }, n.peer_id)],
  ]);
}

function renderStorage(st) {
  const err = sectionError(st);
  if (err) { fillList("storage-list", [["error", err]]); return; }
  const limit = st.quota_bytes || (st.bytes + st.disk_free_bytes);
  document.getElementById("storage-bar").style.width = `${Math.min(100, (100 * st.bytes) / Math.max(1, limit))}%`;
  const kinds = Object.entries(st.by_kind).map(([k, v]) => `${k}: ${v.blobs} (${fmtBytes(v.bytes)})`).join(", ");
  fillList("storage-list", [
    ["Held", `${st.blobs} blobs, ${fmtBytes(st.bytes)}`],
    ["Quota", st.quota_bytes ? fmtBytes(st.quota_bytes) : "none (disk reserve only)"],
    ["Disk free", `${fmtBytes(st.disk_free_bytes)} of ${fmtBytes(st.disk_total_bytes)}`],
    ["By kind", kinds || "–"],
    ["Absent", `${st.absent_blobs} (fetched on demand)`],
    ["Pinned", st.pinned_blobs],
    ["Also in R2", st.r2_present_blobs],
  ]);
}

function renderReplication(r) {
  const err = sectionError(r);
  if (err) { fillList("replication-list", [["error", err]]); return; }
  const states = Object.entries(r.by_state).map(([k, v]) => `${k}: ${v}`).join(", ");
  const kinds = Object.entries(r.open_by_kind).map(([k, v]) => `${k}: ${v}`).join(", ");
  fillList("replication-list", [
    ["Jobs (24 h)", states || "none"],
    ["Open by kind", kinds || "none"],
    ["Oldest open", r.oldest_open_age_s === null ? "–" : fmtDuration(r.oldest_open_age_s)],
  ]);
  fillTable("replication-failures", r.recent_failures.map((f) => [
    f.kind, el("span", { class: "mono" }, String(f.target).slice(0, 16) + "…"), f.attempts, el("span", { class: "bad" }, f.last_error),
  ]));
}

function renderSavings(t) {
  const s = t.savings;
  document.getElementById("savings-share").textContent = fmtPct(s.share_of_fetched);
  document.getElementById("savings-text").textContent =
    `${fmtBytes(s.p2p_bytes)} came from LAN and libp2p peers instead of R2 ` +
    `(${fmtPct(s.share_of_served)} of all ${fmtBytes(s.total_bytes)} served since start).`;
  const vs = t.viewer_swarm;
  if (vs && vs.peer_bytes + vs.http_bytes > 0) {
    document.getElementById("savings-text").textContent +=
      ` Viewers got ${fmtBytes(vs.peer_bytes)} from each other (${fmtPct(vs.share_from_peers)} ` +
      `of their segment bytes): uplink bytes this node did not send.`;
  }
  const max = Math.max(1, ...Object.values(t.bytes_by_source));
  fillTable("sources", Object.entries(t.bytes_by_source).map(([src, n]) => {
    const bar = el("div", { class: "bar" });
    bar.style.width = `${(100 * n) / max}%`;
    return [el("span", { class: `src-${SOURCES.includes(src) ? src : "other"}` }, src), el("td", { class: "num" }, fmtBytes(n)), bar];
  }));
}

function renderChart(t) {
  const chart = document.getElementById("chart");
  const W = 800, H = 220, L = 86, R = 10, T = 10, B = 24;
  chart.replaceChildren();
  const points = t.rates;
  const sources = [...new Set([...SOURCES, ...points.flatMap((p) => Object.keys(p.bytes_per_s))])];
  const max = Math.max(1, ...points.flatMap((p) => Object.values(p.bytes_per_s)));
  const t1 = points.length ? points[points.length - 1].t : Date.now() / 1000;
  const t0 = Math.min(t1 - 60, points.length ? points[0].t : t1 - 3600);
  const x = (tt) => L + ((tt - t0) / Math.max(1, t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  for (const f of [0, 0.5, 1]) {
    chart.append(svg("line", { x1: L, x2: W - R, y1: y(max * f), y2: y(max * f), stroke: "#e3e6eb" }));
    const label = svg("text", { x: L - 6, y: y(max * f) + 4, "text-anchor": "end" });
    label.textContent = `${fmtBytes(max * f)}/s`;
    chart.append(label);
  }
  const ago = svg("text", { x: L, y: H - 6 });
  ago.textContent = `${fmtDuration(t1 - t0)} ago`;
  const now = svg("text", { x: W - R, y: H - 6, "text-anchor": "end" });
  now.textContent = "now";
  chart.append(ago, now);
  const colors = { local: "#6b7280", lan: "#15803d", libp2p: "#7c3aed", r2: "#ea580c" };
  for (const src of sources) {
    if (points.length < 1) break;
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.bytes_per_s[src] || 0).toFixed(1)}`).join(" ");
    chart.append(svg("path", { d, fill: "none", stroke: colors[src] || "#0891b2", "stroke-width": 2 }));
  }
  if (points.length < 1) {
    const wait = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" });
    wait.textContent = `collecting samples (every ${t.sample_interval_s} s)`;
    chart.append(wait);
  }
  document.getElementById("legend").replaceChildren(
    ...sources.map((s) => el("span", { class: `src-${SOURCES.includes(s) ? s : "other"}` }, s)));
  const daily = Array.isArray(t.daily) ? t.daily : [];
  fillTable("daily", daily.slice(-7).reverse().map((d) => [
    d.day, Object.entries(d.bytes_by_source).map(([k, v]) => `${k} ${fmtBytes(v)}`).join(", "),
  ]));
}

function peerRows(list) {
  return list.map((p) => [
    el("span", { class: "mono" }, String(p.peer_id).slice(0, 20) + "…"),
    p.http_url || "–",
    p.rtt_ms === null || p.rtt_ms === undefined ? "–" : `${Number(p.rtt_ms).toFixed(1)} ms`,
    p.seen_ago_s === null ? "–" : `${fmtDuration(p.seen_ago_s)} ago`,
    p.failures ?? 0,
  ]);
}

function renderPeers(p) {
  const err = sectionError(p);
  if (err) { fillTable("peers-lan", [[err]]); return; }
  fillTable("peers-lan", p.lan.length ? peerRows(p.lan) : [["none seen"]]);
  fillTable("peers-libp2p", p.libp2p.length ? peerRows(p.libp2p) : [["none seen"]]);
}

function renderMedia(list) {
  const err = sectionError(list);
  if (err) { fillTable("media", [[err]]); return; }
  fillTable("media", list.length ? list.map((m) => {
    const rends = m.renditions.map((r) => `${r.rendition_id} ${r.height ? r.height + "p " : ""}${r.container}`).join(", ");
    const playable = m.renditions.some((r) => r.container === "fmp4");
    const actions = el("span", {});
    if (playable) {
      actions.append(el("button", { class: "play", "data-media": m.media_id, onclick: () => play(m.media_id, m.title) }, "Play"));
    }
    // MSE takes no MPEG-TS; WebRTC plays any item, through the node's own WHEP player.
    actions.append(el("button", { class: "play whep", "data-media": m.media_id, onclick: () => playWhep(m.media_id, m.title) }, "WebRTC"));
    return [m.title || el("span", { class: "mono" }, m.media_id), fmtDuration(m.duration_s), rends,
      `${m.local_segments}/${m.segments} segments, ${fmtBytes(m.local_bytes)}`, m.r2_state, actions];
  }) : [["No media yet: add some with the packaging command (see README)."]]);
}

function once(target, event) {
  return new Promise((resolve, reject) => {
    target.addEventListener(event, resolve, { once: true });
    target.addEventListener("error", reject, { once: true });
  });
}

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (r.status === 401) { location.reload(); throw new Error("session expired"); }
  if (!r.ok) throw new Error(`${url}: ${r.status} ${(await r.json().catch(() => ({}))).message || ""}`);
  return r.json();
}

// Plays an fMP4 rendition with Media Source Extensions: the init segment, then every media
// segment in order, fetched by blob id. Chromium has no native HLS; this needs no hls.js.
// Plays any item over WebRTC: frames the node's WHEP player page (same origin), which posts its
// offer with a short-lived token the dashboard mints for the operator.
async function playWhep(mediaId, title) {
  const frame = document.getElementById("whep-frame");
  const note = document.getElementById("player-note");
  stopPlayers();
  try {
    const link = await getJSON(`/ui/api/whep/${encodeURIComponent(mediaId)}`);
    frame.hidden = false;
    frame.dataset.media = mediaId;
    frame.src = link.player;
    document.getElementById("player").dataset.media = mediaId;
    note.textContent = `Playing ${title || mediaId} over WebRTC`;
  } catch (e) {
    note.textContent = `WebRTC playback unavailable: ${e.message}`;
  }
}

function stopPlayers() {
  const frame = document.getElementById("whep-frame");
  const whep = frame.contentWindow && frame.contentWindow.whep;
  if (whep && whep.stop) whep.stop().catch(() => {});
  frame.hidden = true;
  frame.removeAttribute("src");
  delete frame.dataset.media;
  const video = document.getElementById("player");
  video.pause();
  video.hidden = true;
}

async function play(mediaId, title) {
  const video = document.getElementById("player");
  const note = document.getElementById("player-note");
  stopPlayers();
  const info = await getJSON(`/ui/api/media/${encodeURIComponent(mediaId)}`);
  const mime = (r) => `${r.kind === "audio" ? "audio" : "video"}/mp4; codecs="${r.codecs}"`;
  const candidates = info.renditions.filter((r) => r.container === "fmp4" && r.init_cid &&
    r.segments.length && r.segments.every((s) => s.cid));
  const r = candidates.filter((c) => c.kind === "video").concat(candidates)
    .find((c) => MediaSource.isTypeSupported(mime(c)));
  if (!r) { note.textContent = "No rendition of this item can be played in this browser."; return; }
  const ms = new MediaSource();
  video.hidden = false;
  video.src = URL.createObjectURL(ms);
  await once(ms, "sourceopen");
  const sb = ms.addSourceBuffer(mime(r));
  note.textContent = `Playing ${title || mediaId}: rendition ${r.rendition_id} (${r.codecs})`;
  video.dataset.media = mediaId;
  let started = false;
  for (const cid of [r.init_cid, ...r.segments.map((s) => s.cid)]) {
    const resp = await fetch(`/ui/api/blob/${cid}`, { credentials: "same-origin" });
    if (!resp.ok) { note.textContent = `Segment ${cid} unavailable (${resp.status}).`; break; }
    sb.appendBuffer(await resp.arrayBuffer());
    await once(sb, "updateend");
    if (!started && video.readyState >= 2) { started = true; video.play().catch(() => {}); }
  }
  if (ms.readyState === "open") ms.endOfStream();
  if (!started) await video.play().catch(() => {});
}

// Live inputs: status rows; a connected input's LL-HLS playlist plays with hls.js, which the
// node serves at /swarm/lib/ (loaded on the first preview only).
let hlsLoaded = null;
let livePlayer = null;

function loadHls() {
  hlsLoaded = hlsLoaded || new Promise((resolve, reject) => {
    const s = el("script", { src: "/swarm/lib/hls.min.js" });
    s.addEventListener("load", resolve, { once: true });
    s.addEventListener("error", () => reject(new Error("hls.js is not installed on this node")), { once: true });
    document.head.append(s);
  });
  return hlsLoaded;
}

async function previewLive(input, url) {
  const video = document.getElementById("live-player");
  const note = document.getElementById("live-note");
  if (livePlayer) { livePlayer.destroy(); livePlayer = null; }
  video.hidden = false;
  video.dataset.input = input;
  try {
    await loadHls();
    if (window.Hls && window.Hls.isSupported()) {
      // No worker: the page's CSP allows scripts from this origin only, not blob: workers.
      livePlayer = new window.Hls({ lowLatencyMode: true, enableWorker: false });
      livePlayer.loadSource(url);
      livePlayer.attachMedia(video);
    } else {
      video.src = url;
    }
    video.play().catch(() => {});
    note.textContent = `Previewing ${input} (low-latency HLS)`;
  } catch (e) {
    note.textContent = `Preview unavailable: ${e.message}`;
  }
}

function renderLive(doc) {
  const rows = doc.inputs.map((i) => {
    const status = el("span", { class: `pill ${i.connected ? "ok" : ""}` }, i.connected ? "live" : "offline");
    const actions = el("span", {});
    if (i.preview) {
      actions.append(el("button", { class: "preview", "data-input": i.input, onclick: () => previewLive(i.input, i.preview) }, "Preview"));
    }
    return [
      i.input, status,
      i.since ? new Date(i.since * 1000).toLocaleTimeString() : "–",
      i.protocol ? `${i.protocol} from ${i.remote}` : "–",
      i.codecs.join(", ") || "–",
      i.connected ? `${(i.bitrate_bps / 1e6).toFixed(2)} Mbit/s` : "–",
      i.latency_s != null ? `${i.latency_s.toFixed(1)} s` : "–",
      i.viewers,
      i.last_recording ? el("span", { class: "mono" }, i.last_recording.slice(0, 16) + "…") : (i.record ? "none yet" : "not recorded"),
      actions,
    ];
  });
  fillTable("live-inputs", rows.length ? rows : [["No live inputs configured ([live] inputs, see README)."]]);
  if (doc.note) document.getElementById("live-note").textContent = doc.note;
}

async function refreshLive() {
  try {
    renderLive(await getJSON("/ui/api/live"));
  } catch (e) {
    fillTable("live-inputs", [[`Cannot load the live inputs: ${e.message}`]]);
  }
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const s = await getJSON("/ui/api/summary");
    renderNode(s);
    renderStorage(s.storage);
    renderReplication(s.replication);
    renderSavings(s.traffic);
    renderChart(s.traffic);
    renderPeers(s.peers);
    await refreshLive();
    if (renders === 0 || !document.getElementById("player").dataset.media) renderMedia(s.media);
    error.hidden = true;
    renders += 1;
    document.body.dataset.renders = String(renders);
  } catch (e) {
    error.textContent = `Cannot load the summary: ${e.message}`;
    error.hidden = false;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
