#!/usr/bin/env bash
# peerd packaging vs the ffmpeg CLI on the same source, same run, as wall-time ratios.
#
#   remux:     ffmpeg -c copy -f hls (fMP4, 4 s)        vs  peerd ingest (remux, fMP4, 4 s), the
#              node's daemon running (`peerd ingest` hands the file to it over the control
#              socket, see peerd/ctl.py: how the command is used on a node)
#              Two daemon rows: restarted on a fresh node before every run, and the same plus one
#              ingest of other content (a 10 s test pattern) before the timed one, as a daemon that
#              has been running does (its first ingest pays for fresh memory and thread pools)
#   remux --local: the same with `peerd ingest --local`, no daemon (the command packages in its
#              own process: interpreter start, imports, catalog open, all in the timed run)
#   transcode: ffmpeg scale=1280:720 + libx264 veryfast vs  peerd ingest --transcode always
#              --max-height 720 (same x264 settings: CRF 23, mbtree off, IDR every 4 s, audio copied),
#              with the daemon running and with --local, as for remux
#
# peerd's side includes everything `peerd ingest` does: interpreter start, probing, hashing every
# blob, writing it durably (temp file, fsync, rename, fsync dir) and the catalog transaction.
# Each peerd run starts from a fresh copy of an empty, initialised node, so every blob is
# really written.
#
# With the daemon (peerd-remux, and peerd-daemon-remux: the same ingest asked over the HTTP API,
# POST /api/v1/commands/ingest then polling the job, by scripts/bench/api_ingest.py), the daemon
# is restarted on a fresh node before every run (not timed). Its CPU is the daemon's, so the CPU
# ratio column is the client's only and "other cores busy" includes the daemon.
#
# Usage: scripts/bench/package_bench.sh [SRC]   (default: the 120 s 1080p source of
#        ../shared/bench/make_media.sh, made if missing)
# Env:   ROUNDS (3)  WHAT ("remux transcode"; "daemon" adds the HTTP API row)  TRANSCODE_SECONDS (cut the transcode source to
#        its first N s)  PY (the repository's .venv/bin/python)  OUT (/tmp/peerd-bench/package-<stamp>)
#        QUIET_THRESH / QUIET_MAX (passed to timerun.py: wait for a quiet machine before each run)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# ../shared sits next to the main checkout; a git worktree finds the main checkout through its
# common git directory.
GITDIR=$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
MAIN=$(if [[ -n $GITDIR ]]; then dirname "$GITDIR"; else echo "$REPO"; fi)
SHARED=${SHARED_BENCH:-$MAIN/../shared/bench}
PY=${PY:-$REPO/.venv/bin/python}
ROUNDS=${ROUNDS:-3}
WHAT=${WHAT:-remux transcode}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-/tmp/peerd-bench/package-$STAMP}
W=$OUT/work
mkdir -p "$OUT" "$W"

SRC=${1:-/tmp/peerd-bench/src_1080p.mp4}
if [[ ! -s $SRC ]]; then
  "$SHARED/make_media.sh" "$(dirname "$SRC")"
fi
SRC=$(cd "$(dirname "$SRC")" && pwd)/$(basename "$SRC")

FF="ffmpeg -hide_banner -loglevel error -nostdin -y"
HLS="-f hls -hls_time 4 -hls_playlist_type vod -hls_list_size 0 -hls_segment_type fmp4 -hls_fmp4_init_filename init.mp4"
PEERD="env PYTHONPATH=$REPO $PY -m peerd"
prep() { echo "rm -rf $W/$1 && mkdir -p $W/$1"; }
# peerd ingests into an existing, empty node (made once by `peerd init`), as in real use.
$PEERD --state-dir "$W/node-template" init >/dev/null
prep_node() { echo "rm -rf $W/$1 && cp -a $W/node-template $W/$1"; }

{
  echo "source: $SRC ($(stat -c %s "$SRC") bytes)"
  echo "ffmpeg: $(ffmpeg -version | head -1)"
  echo "pyav:   $($PY -c 'import av; print(av.__version__, av.library_versions["libavcodec"])')"
  echo "peerd:  $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "${PEERD_REV:-unknown}")"
  echo "cpus:   $(nproc)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/versions.txt"

T="$PY $SHARED/timerun.py"
DAEMON_ARGS=()
if [[ " $WHAT " == *" remux "* || " $WHAT " == *" transcode "* ]]; then
  PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cat >"$W/daemon.toml" <<TOML
[node]
state_dir = "$W/peerd-daemon"
[http]
port = $PORT
[media]
library_dirs = ["$(dirname "$SRC")"]
[mdns]
enabled = false
[p2p]
enabled = false
[webrtc]
enabled = false
TOML
  cat >"$W/daemon_prep.sh" <<PREP
set -e
if [[ -s $W/daemon.pid ]]; then kill \$(cat $W/daemon.pid) 2>/dev/null || true; fi
while [[ -s $W/daemon.pid ]] && kill -0 \$(cat $W/daemon.pid) 2>/dev/null; do sleep 0.1; done
rm -rf $W/peerd-daemon && cp -a $W/node-template $W/peerd-daemon
setsid env PYTHONPATH=$REPO $PY -m peerd --config $W/daemon.toml run >$W/daemon.log 2>&1 </dev/null &
echo \$! >$W/daemon.pid
for _ in \$(seq 300); do
  if curl -fs -o /dev/null http://127.0.0.1:$PORT/readyz; then
    # "warm": the daemon has done one ingest since it started (of other content: no blob shared).
    if [[ \${1:-} == warm ]]; then
      env PYTHONPATH=$REPO $PY -m peerd --config $W/daemon.toml ingest --no-progress $W/warm.mp4 >/dev/null
    fi
    exit 0
  fi
  sleep 0.1
done
echo "daemon did not become ready (see $W/daemon.log)" >&2; exit 1
PREP
  # Other content than the source (a test pattern), for the warm daemon's one earlier ingest.
  $FF -f lavfi -i testsrc2=size=640x360:rate=30:duration=10 -c:v libx264 -preset veryfast -g 30 \
    -pix_fmt yuv420p "$W/warm.mp4"
  trap '[[ -s $W/daemon.pid ]] && kill $(cat $W/daemon.pid) 2>/dev/null || true' EXIT
  DAEMON_ARGS=(--cmd peerd-remux "$PEERD --config $W/daemon.toml ingest --no-progress $SRC >/dev/null"
    --prep peerd-remux "bash $W/daemon_prep.sh"
    --cmd peerd-remux-warm "$PEERD --config $W/daemon.toml ingest --no-progress $SRC >/dev/null"
    --prep peerd-remux-warm "bash $W/daemon_prep.sh warm")
  if [[ " $WHAT " == *" daemon "* ]]; then
    DAEMON_ARGS+=(--cmd peerd-daemon-remux "$PY -S $REPO/scripts/bench/api_ingest.py http://127.0.0.1:$PORT $W/peerd-daemon/secrets/api_token $SRC >/dev/null"
      --prep peerd-daemon-remux "bash $W/daemon_prep.sh")
  fi
fi
if [[ " $WHAT " == *" remux "* ]]; then
  $T --rounds "$ROUNDS" --warmup 1 --out "$OUT/remux.json" \
    --cmd ff-remux "$FF -i $SRC -map 0 -c copy $HLS -hls_segment_filename $W/ff-remux/seg_%03d.m4s $W/ff-remux/index.m3u8" \
    --prep ff-remux "$(prep ff-remux)" \
    --cmd peerd-remux-local "$PEERD --state-dir $W/peerd-remux ingest --local --no-progress $SRC >/dev/null" \
    --prep peerd-remux-local "$(prep_node peerd-remux)" \
    "${DAEMON_ARGS[@]}"
fi

if [[ " $WHAT " == *" transcode "* ]]; then
  TSRC=$SRC
  if [[ -n ${TRANSCODE_SECONDS:-} ]]; then
    TSRC=$W/src_${TRANSCODE_SECONDS}s.mp4
    $FF -i "$SRC" -t "$TRANSCODE_SECONDS" -map 0 -c copy "$TSRC"
  fi
  # The same encoder work on both sides: scale to 720p in libavfilter (bicubic), x264 veryfast
  # CRF 23 without mbtree, keyframes forced every 4 s (peerd cuts its segments there), audio copied.
  X264="-c:v libx264 -preset veryfast -crf 23 -x264-params mbtree=0 -g 600 -force_key_frames 'expr:gte(t,n_forced*4)'"
  $T --rounds "$ROUNDS" --out "$OUT/transcode.json" \
    --cmd ff-transcode "$FF -i $TSRC -map 0:v -map 0:a -vf scale=1280:720:flags=bicubic $X264 -c:a copy $HLS -hls_segment_filename $W/ff-transcode/seg_%03d.m4s $W/ff-transcode/index.m3u8" \
    --prep ff-transcode "$(prep ff-transcode)" \
    --cmd peerd-transcode "$PEERD --config $W/daemon.toml ingest --no-progress --transcode always --max-height 720 $TSRC >/dev/null" \
    --prep peerd-transcode "bash $W/daemon_prep.sh" \
    --cmd peerd-transcode-local "$PEERD --state-dir $W/peerd-transcode ingest --local --no-progress --transcode always --max-height 720 $TSRC >/dev/null" \
    --prep peerd-transcode-local "$(prep_node peerd-transcode)"
fi

"$PY" - "$OUT" <<'EOF'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
print("\n| what | ffmpeg CLI wall s (median) | peerd wall s (median) | peerd / ffmpeg (median of per-round ratios) | CPU ratio | other cores busy (max) |")
print("|---|---|---|---|---|---|")
for what, file, name in (
    ("remux (daemon just started)", "remux", "peerd-remux"),
    ("remux (daemon running, one other file ingested since its start)", "remux", "peerd-remux-warm"),
    ("remux --local (no daemon)", "remux", "peerd-remux-local"),
    ("remux via daemon API", "remux", "peerd-daemon-remux"),
    ("transcode (daemon running)", "transcode", "peerd-transcode"),
    ("transcode --local (no daemon)", "transcode", "peerd-transcode-local"),
):
    f = out / f"{file}.json"
    if not f.exists():
        continue
    runs = json.loads(f.read_text())["runs"]
    ff = {r["round"]: r for r in runs if r["name"] == f"ff-{file}"}
    pe = {r["round"]: r for r in runs if r["name"] == name}
    if not pe:
        continue
    rounds = sorted(set(ff) & set(pe))
    ratios = [pe[k]["wall_s"] / ff[k]["wall_s"] for k in rounds]
    cpu = [(pe[k]["user_s"] + pe[k]["sys_s"]) / (ff[k]["user_s"] + ff[k]["sys_s"]) for k in rounds]
    other = max(r["other_cores"] for r in runs)
    print(f"| {what} | {statistics.median(r['wall_s'] for r in ff.values()):.2f} "
          f"| {statistics.median(r['wall_s'] for r in pe.values()):.2f} "
          f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
          f"| {statistics.median(cpu):.2f}x | {other:.2f} |")
EOF
echo "raw results: $OUT"
