#!/usr/bin/env bash
# Run a command beside the load a shared CI machine puts on the tests, to show they hold under it:
# 4 processes spinning on the CPU and 1 writer doing write+fsync in a loop (disk stalls count: a
# page fault or a write queued behind someone's fsync is neither the test's fault nor CPU time).
#
#   bash tests/load.sh .venv/bin/python -m pytest -n 2 --dist loadfile -q -p no:cacheprovider
#
# The load ends with the command (trap on EXIT, INT, TERM) or after LOAD_MAX_S seconds (default
# 3600), whichever is first. The writer rewrites one file of LOAD_WRITE_MB MiB (default 256) in
# 4 MiB chunks under $TMPDIR, removed on exit. Prints the 1-minute load average seen while the
# command ran (sampled every 5 s) and exits with the command's status.
set -uo pipefail

max_s=${LOAD_MAX_S:-3600}
write_mb=${LOAD_WRITE_MB:-256}
dir=$(mktemp -d "${TMPDIR:-/tmp}/peerd-load.XXXXXX")
pids=()

stop_load() {
    if ((${#pids[@]})); then
        kill "${pids[@]}" 2>/dev/null
        wait "${pids[@]}" 2>/dev/null
    fi
    rm -rf "$dir"
}
trap stop_load EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for _ in 1 2 3 4; do
    timeout "$max_s" sh -c 'while :; do :; done' &
    pids+=($!)
done

head -c 4M /dev/urandom >"$dir/chunk"
timeout "$max_s" bash -c '
    chunks=$(($2 / 4)) i=0
    while :; do
        dd if="$1/chunk" of="$1/written" bs=4M seek=$((i % chunks)) conv=notrunc,fsync status=none
        i=$((i + 1))
    done' writer "$dir" "$write_mb" &
pids+=($!)

timeout "$max_s" bash -c 'while :; do cut -d" " -f1 /proc/loadavg >>"$1/loadavg"; sleep 5; done' \
    sampler "$dir" &
pids+=($!)

echo "load.sh: 4 CPU burners + 1 write+fsync writer (${write_mb} MiB in $dir) beside: $*" >&2
"$@"
status=$?

sort -g "$dir/loadavg" | awk -v status="$status" '
    { n++; sum += $1; v[n] = $1 }
    END {
        if (n) printf "load.sh: 1-min load average over %d samples: min %s, mean %.1f, max %s", n, v[1], sum / n, v[n]
        printf "; command exited %d\n", status
    }' >&2
exit "$status"
