"use strict";
// Playback analytics panel (README "Playback analytics"): polls /ui/api/playback. Success per
// codec, startup and stall charts by hour (SVG), the swarm's P2P share, recent anomalies.
// Text from the node is only ever set as textContent.

(() => {
  const NS = "http://www.w3.org/2000/svg";
  const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);
  const secs = (x) => (x === null || x === undefined ? "–" : `${x.toFixed(2)} s`);

  function cell(text) {
    const td = document.createElement("td");
    td.textContent = String(text ?? "");
    return td;
  }

  function rows(id, list) {
    const body = document.querySelector(`#${id} tbody`);
    body.replaceChildren(...list.map((cells) => {
      const tr = document.createElement("tr");
      tr.append(...cells.map(cell));
      return tr;
    }));
  }

  function bars(id, points, value, label, color) {
    const chart = document.getElementById(id);
    const W = 400, H = 140, L = 44, B = 18, T = 8;
    chart.replaceChildren();
    const max = Math.max(1e-9, ...points.map(value));
    const w = (W - L) / Math.max(points.length, 1);
    points.forEach((p, i) => {
      const v = value(p);
      const h = ((H - B - T) * v) / max;
      const r = document.createElementNS(NS, "rect");
      for (const [k, x] of Object.entries({ x: L + i * w + 1, y: H - B - h, width: Math.max(w - 2, 1), height: h, fill: color })) r.setAttribute(k, String(x));
      const t = document.createElementNS(NS, "title");
      t.textContent = `${new Date(p.hour * 1000).toISOString().slice(0, 13)}h: ${label(v)}`;
      r.append(t);
      chart.append(r);
    });
    const top = document.createElementNS(NS, "text");
    top.setAttribute("x", String(L - 4));
    top.setAttribute("y", String(T + 8));
    top.setAttribute("text-anchor", "end");
    top.textContent = label(max);
    chart.append(top);
    if (!points.length) {
      const wait = document.createElementNS(NS, "text");
      wait.setAttribute("x", String(W / 2));
      wait.setAttribute("y", String(H / 2));
      wait.setAttribute("text-anchor", "middle");
      wait.textContent = "no sessions yet";
      chart.append(wait);
    }
  }

  function render(p) {
    rows("playback-codecs", p.codecs.map((r) => [
      r.codec || "(unknown)", r.sessions, pct(r.success_ratio), secs(r.startup_p50_s),
      secs(r.startup_p95_s), r.stall_rate === null ? "–" : r.stall_rate.toFixed(2),
    ]));
    const hours = [...p.hours].sort((a, b) => a.hour - b.hour);
    bars("playback-startup", hours.filter((h) => h.startup_mean_s !== null), (h) => h.startup_mean_s, (v) => `${v.toFixed(2)} s`, "#0891b2");
    bars("playback-stalls", hours, (h) => h.stall_rate || 0, (v) => `${v.toFixed(2)}/session`, "#ea580c");
    const share = p.bytes.p2p_share;
    document.getElementById("playback-p2p").textContent =
      share === null ? "No swarm viewer has reported yet." : `Swarm viewers got ${pct(share)} of their segment bytes from each other.`;
    const list = document.getElementById("playback-anomalies");
    list.replaceChildren(...p.anomalies.map((a) => {
      const li = document.createElement("li");
      li.textContent = `${new Date(a.at * 1000).toISOString().replace("T", " ").slice(0, 19)} ${a.explained}`;
      return li;
    }));
    if (!p.anomalies.length) {
      const li = document.createElement("li");
      li.textContent = "none in the last 24 hours";
      list.append(li);
    }
    document.getElementById("playback").dataset.loaded = "1";
  }

  async function refresh() {
    try {
      const r = await fetch("/ui/api/playback", { credentials: "same-origin", headers: { Accept: "application/json" } });
      const p = r.ok ? await r.json() : null;
      if (p && !p.enabled) { document.getElementById("playback").hidden = true; return; }
      if (p) render(p);
    } catch (e) {
      document.getElementById("playback-p2p").textContent = `Cannot load playback analytics: ${e.message}`;
    }
    setTimeout(refresh, 10000);
  }

  refresh();
})();
