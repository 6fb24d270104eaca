# shellcheck shell=bash
# Shared helpers for the peerd cloudflared scripts. Sourced, never run.
#
# Environment (all optional; the defaults are what a Debian host uses):
#   CLOUDFLARED         the cloudflared binary              (cloudflared)
#   SYSTEMCTL           the systemctl binary                (systemctl)
#   CLOUDFLARED_ETC     cloudflared's config directory      (/etc/cloudflared)
#   SYSTEMD_UNIT_DIR    where `service install` puts units  (/etc/systemd/system)
#   TUNNEL_ORIGIN_CERT  cert.pem from `cloudflared tunnel login` (~/.cloudflared/cert.pem);
#                       cloudflared reads the same variable.

CLOUDFLARED="${CLOUDFLARED:-cloudflared}"
SYSTEMCTL="${SYSTEMCTL:-systemctl}"
CLOUDFLARED_ETC="${CLOUDFLARED_ETC:-/etc/cloudflared}"
SYSTEMD_UNIT_DIR="${SYSTEMD_UNIT_DIR:-/etc/systemd/system}"
TUNNEL_ORIGIN_CERT="${TUNNEL_ORIGIN_CERT:-${HOME:-/root}/.cloudflared/cert.pem}"
export TUNNEL_ORIGIN_CERT
# shellcheck disable=SC2034 # used by the scripts that source this file
DEFAULT_TUNNEL_NAME="peerd"
# shellcheck disable=SC2034
DEFAULT_PORT="8737"

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage_error() { log "$*"; log "run with --help for usage"; exit 2; }

require_cloudflared() {
	command -v "$CLOUDFLARED" >/dev/null 2>&1 ||
		die "cloudflared not found; install it from Cloudflare's apt repository (README: Tunnel setup)"
}

require_login() {
	[[ -f "$TUNNEL_ORIGIN_CERT" ]] ||
		die "no origin certificate at $TUNNEL_ORIGIN_CERT; run \`cloudflared tunnel login\` first"
}

# A DNS hostname: labels of letters, digits and hyphens, at least one dot, at most 253 chars.
valid_hostname() {
	local h="$1"
	[[ ${#h} -le 253 ]] || return 1
	[[ "$h" =~ ^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$ ]]
}

# A tunnel name as cloudflared accepts it.
valid_name() { [[ "$1" =~ ^[_a-zA-Z0-9][-_.a-zA-Z0-9]{0,63}$ ]]; }

valid_port() { [[ "$1" =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }

valid_uuid() { [[ "$1" =~ ^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$ ]]; }

# The id of the live (not deleted) tunnel called $1, or nothing.
tunnel_id_by_name() {
	local json
	json="$("$CLOUDFLARED" tunnel list --output json --name "$1")" ||
		die "cloudflared tunnel list failed"
	printf '%s' "$json" | python3 -c '
import json, sys
name = sys.argv[1]
# A live tunnel has no deletion time (Go writes the zero time 0001-01-01T00:00:00Z).
live = [
    t for t in json.load(sys.stdin)
    if t.get("name") == name and str(t.get("deleted_at") or "0001-").startswith("0001-")
]
if len(live) > 1:
    sys.exit(f"more than one live tunnel is called {name!r}")
if live:
    print(live[0]["id"])
' "$1"
}

# The TunnelID field of a credentials file.
tunnel_id_from_credentials() {
	python3 -c '
import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    print(json.load(f)["TunnelID"])
' "$1"
}

# Replace $2 with the content of file $1 unless identical; prints created/updated/kept.
install_file() {
	local src="$1" dst="$2" mode="$3"
	if [[ -f "$dst" ]] && cmp -s "$src" "$dst"; then
		rm -f "$src"
		chmod "$mode" "$dst"
		echo kept
		return
	fi
	local what=created
	[[ -e "$dst" ]] && what=updated
	chmod "$mode" "$src"
	mv -f "$src" "$dst"
	echo "$what"
}
