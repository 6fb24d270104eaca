// peerd's viewer swarm player: hls.js with P2P Media Loader, viewers of one media sharing
// segments over WebRTC, coordinated by the node's tracker (/swarm/<media id>).
//
// Every segment URL of a peerd node names its bytes: /hls/<media>/b/<cid>.<ext>, the cid a
// CIDv1 (raw codec, sha2-256) in base32. A segment from a peer is hashed here (WebCrypto
// SHA-256) and compared with that cid before hls.js sees it; on a mismatch P2P Media Loader
// closes the connection to that peer and the segment is fetched again (from another peer or
// over HTTP); stats.refusedPeers names such peers. A rendition whose segment URLs name no
// cid (on-demand) cannot be checked: a viewer that loads one leaves the swarm.
//
// Needs a secure context (https, or http on localhost) for WebCrypto; elsewhere it plays over
// HTTP only. Load hls.js (window.Hls) and an import map for "p2p-media-loader-core" first, as
// the node's page /swarm/player/<media id> does (README "Viewer swarm player").

import { HlsJsP2PEngine } from "./p2p-media-loader-hlsjs.es.min.js";

const CID_RE = /\/b\/(b[a-z2-7]{58})\.[a-z0-9]+(?:[?#]|$)/;
const CID_PREFIX = [0x01, 0x55, 0x12, 0x20]; // CIDv1, raw, sha2-256, 32 bytes
const B32 = "abcdefghijklmnopqrstuvwxyz234567";

/** The SHA-256 digest a segment URL names, or null when it names none. */
export function urlDigest(url) {
  const m = CID_RE.exec(url);
  if (!m) return null;
  const out = [];
  let acc = 0;
  let bits = 0;
  for (const ch of m[1].slice(1)) {
    acc = (acc << 5) | B32.indexOf(ch);
    bits += 5;
    if (bits >= 8) {
      bits -= 8;
      out.push((acc >> bits) & 0xff);
    }
  }
  if (out.length !== 36 || CID_PREFIX.some((b, i) => out[i] !== b)) return null;
  return new Uint8Array(out.slice(4));
}

/** True when ``data`` hashes to the digest its URL names (false when it names none). */
export async function segmentMatches(url, data) {
  const want = urlDigest(url);
  if (want === null) return false;
  const got = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return got.length === want.length && got.every((b, i) => b === want[i]);
}

function trackerUrl(base, media, token) {
  const u = new URL(`/swarm/${media}`, base);
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  if (token) u.searchParams.set("token", token);
  return u.href;
}

/**
 * Play ``opts.media`` from the node at ``opts.node`` (default: this page's origin) in ``video``.
 * opts: media, token, iceServers ([{urls, username?, credential?}]), relayOnly (TURN-relayed
 * candidates only), p2p (false: HTTP only),
 * reportIntervalS, core (P2P Media Loader core overrides), hls (hls.js config overrides).
 * Returns {hls, stats, report, urlDigest}: ``stats`` counts bytes by source, refused segments and peers,
 * and playback stalls (seconds from "waiting" to "playing" after playback began).
 * The beacon also reports this playback to the node's analytics (README "Playback analytics"):
 * a session id, the codec string, the startup time (loadSource to the first "playing"), the
 * stalls so far, and whether it gave up (a fatal error before playing).
 */
export function startPlayer(video, opts) {
  const base = opts.node || window.location.origin;
  const q = opts.token ? `?token=${encodeURIComponent(opts.token)}` : "";
  const src = new URL(`/hls/${opts.media}/master.m3u8${q}`, base).href;
  const reportUrl = new URL(`/swarm/${opts.media}/report${q}`, base).href;
  const stats = {
    peerBytes: 0, httpBytes: 0, reportedPeer: 0, reportedHttp: 0,
    refusedSegments: 0, refusedPeers: [], peersConnected: 0, peersClosed: [],
    stalls: [], playing: false, ended: false, errors: [],
    sid: (window.crypto && crypto.randomUUID) ? crypto.randomUUID() : Math.random().toString(36).slice(2),
    startupMs: null, failed: false, codec: "",
  };
  const canVerify = Boolean(window.isSecureContext && window.crypto && crypto.subtle);
  const p2p = opts.p2p !== false && canVerify;

  async function validate(url, byteRange, data) {
    const ok = !byteRange && (await segmentMatches(url, data));
    if (!ok) {
      stats.refusedSegments += 1;
      console.warn("peerd: refused a segment from a peer", url.split("?")[0], data.byteLength);
    }
    return ok;
  }

  const HlsP2P = HlsJsP2PEngine.injectMixin(window.Hls);
  const hls = new HlsP2P({
    // hls.js hands segments to its worker by transferring their buffers, which empties the
    // very buffers P2P Media Loader keeps to verify and to share: no worker with a swarm.
    enableWorker: !p2p,
    ...(opts.hls || {}),
    p2p: {
      core: {
        swarmId: opts.media,
        announceTrackers: [trackerUrl(base, opts.media, opts.token)],
        rtcConfig: {
          iceServers: opts.iceServers || [],
          ...(opts.relayOnly ? { iceTransportPolicy: "relay" } : {}),
        },
        validateP2PSegment: validate,
        isP2PDisabled: !p2p,
        // Segments within highDemandTimeWindow of the playhead come over HTTP when no peer
        // has them yet; those further ahead wait for peers. A short window (and a moment at
        // the start to meet the swarm) is what spares the node's uplink.
        highDemandTimeWindow: 6,
        httpDownloadInitialTimeoutMs: p2p ? 1500 : 0,
        ...(opts.core || {}),
      },
      onHlsJsCreated(h) {
        const e = h.p2pEngine;
        e.addEventListener("onSegmentLoaded", (d) => {
          if (d.downloadSource === "p2p") stats.peerBytes += d.bytesLength;
          else stats.httpBytes += d.bytesLength;
        });
        e.addEventListener("onSegmentError", (d) => {
          if (d.downloadSource === "p2p" && d.peerId && d.error.type === "p2p-segment-validation-failed") {
            if (!stats.refusedPeers.includes(d.peerId)) stats.refusedPeers.push(d.peerId);
          }
        });
        e.addEventListener("onPeerConnect", () => { stats.peersConnected += 1; });
        e.addEventListener("onPeerClose", (d) => stats.peersClosed.push(d.peerId));
      },
    },
  });

  // A page may watch hls.js itself (the tests check every fragment's hash again there).
  if (typeof window.peerdPlayerHook === "function") window.peerdPlayerHook(hls);
  hls.on(window.Hls.Events.ERROR, (_e, d) => {
    stats.errors.push(`${d.type}:${d.details}:${d.fatal}`);
    if (d.fatal && !stats.playing && !stats.failed) { stats.failed = true; report(); }
    if (d.error) console.warn("peerd: hls.js", d.details, String(d.error && d.error.stack));
  });
  let waitingSince = null;
  video.addEventListener("waiting", () => {
    if (stats.playing && waitingSince === null) waitingSince = performance.now();
  });
  video.addEventListener("playing", () => {
    if (stats.startupMs === null) {
      stats.startupMs = Math.round(performance.now() - loadedAt);
      setTimeout(() => report(), 0);
    }
    stats.playing = true;
    if (waitingSince !== null) stats.stalls.push((performance.now() - waitingSince) / 1000);
    waitingSince = null;
  });
  video.addEventListener("ended", () => { stats.ended = true; });
  // A rendition whose segment URLs name no content id (on-demand) cannot be checked: rather
  // than refuse (and drop) every honest peer's copy, this viewer leaves the swarm.
  hls.on(window.Hls.Events.LEVEL_LOADED, (_e, d) => {
    const frags = (d.details && d.details.fragments) || [];
    if (p2p && frags.length && !frags.every((f) => urlDigest(f.url) !== null)) {
      hls.p2pEngine.applyDynamicConfig({ core: { isP2PDisabled: true } });
      stats.p2pOff = "segments without content ids";
    }
  });
  hls.on(window.Hls.Events.MANIFEST_PARSED, () => { video.play().catch(() => {}); });
  hls.on(window.Hls.Events.LEVEL_SWITCHED, (_e, d) => {
    const level = hls.levels[d.level];
    const codecs = (level && level.attrs && level.attrs.CODECS) || "";
    stats.codec = codecs.replace(/[^A-Za-z0-9.,_-]/g, "").slice(0, 64);
  });
  const loadedAt = performance.now();
  hls.loadSource(src);
  hls.attachMedia(video);

  /** Send the bytes counted since the last beacon (the node allows one per half interval). */
  let reportedPlayback = "";
  function report(useBeacon = false) {
    const playback = {
      sid: stats.sid, codec: stats.codec, startup_ms: stats.startupMs,
      stalls: stats.stalls.length, failed: stats.failed,
    };
    const bytes = { peer: stats.peerBytes - stats.reportedPeer, http: stats.httpBytes - stats.reportedHttp };
    const news = JSON.stringify(playback) !== reportedPlayback;
    if (!news && bytes.peer === 0 && bytes.http === 0) return Promise.resolve(true);
    const body = JSON.stringify({ ...bytes, ...playback });
    const sent = { peer: stats.peerBytes, http: stats.httpBytes, playback: JSON.stringify(playback) };
    const done = () => {
      stats.reportedPeer = sent.peer; stats.reportedHttp = sent.http; reportedPlayback = sent.playback;
    };
    if (useBeacon) {
      if (navigator.sendBeacon(reportUrl, new Blob([body], { type: "text/plain" }))) done();
      return Promise.resolve(true);
    }
    return fetch(reportUrl, { method: "POST", body, headers: { "Content-Type": "text/plain" }, keepalive: true })
      .then((r) => { if (r.ok) done(); return r.ok; })
      .catch(() => false);
  }
  const every = Math.max(1, opts.reportIntervalS || 10) * 1000;
  setInterval(() => { report(); }, every);
  window.addEventListener("pagehide", () => report(true));
  return { hls, stats, report, urlDigest };
}
