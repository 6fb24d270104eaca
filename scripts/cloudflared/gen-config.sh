#!/usr/bin/env bash
# Write cloudflared's config.yml for a peerd node: the viewer-facing paths (HLS, the coordinator
# API, WHEP, the swarm tracker) of HOSTNAME go to peerd on loopback, everything else (the /ui
# dashboard, /metrics) gets a 404 from the required catch-all rule. Optional Access mode makes
# cloudflared itself require a valid Cloudflare Access token on every request. Idempotent: an
# unchanged config is left alone (prints "kept"), a changed one is replaced atomically
# ("updated").
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEFAULT_PATHS=('^/hls/' '^/api/v1/' '^/whep/' '^/swarm/')
# A Go regexp anchored at the start of the path, without quotes, spaces or control characters,
# so that it can be written as a single-quoted YAML scalar as is.
PATH_RE='^\^/[][A-Za-z0-9_./*+?()|{},$\\-]*$'

usage() {
	cat <<USAGE
usage: ${0##*/} --hostname HOSTNAME [options]

  --hostname HOST      public hostname of this node (required)
  --name NAME          tunnel name; its credentials are \$CLOUDFLARED_ETC/NAME.json
                       (default: $DEFAULT_TUNNEL_NAME)
  --port PORT          peerd's HTTP port on 127.0.0.1 (default: $DEFAULT_PORT)
  --path REGEX         a path to publish (Go regexp, repeatable;
                       default: ${DEFAULT_PATHS[*]})
  --access-team TEAM   Access mode: your Zero Trust team name (TEAM.cloudflareaccess.com)
  --access-aud TAG     Access mode: the application's AUD tag (64 hex digits, repeatable)
  --out FILE           where to write (default: \$CLOUDFLARED_ETC/config.yml)
USAGE
}

hostname="" name="$DEFAULT_TUNNEL_NAME" port="$DEFAULT_PORT" team="" out=""
paths=() auds=()
while (($#)); do
	case "$1" in
	--hostname | --name | --port | --path | --access-team | --access-aud | --out)
		[[ $# -ge 2 ]] || usage_error "$1 needs a value"
		case "$1" in
		--hostname) hostname="$2" ;;
		--name) name="$2" ;;
		--port) port="$2" ;;
		--path) paths+=("$2") ;;
		--access-team) team="$2" ;;
		--access-aud) auds+=("$2") ;;
		--out) out="$2" ;;
		esac
		shift 2
		;;
	-h | --help) usage; exit 0 ;;
	*) usage_error "unknown argument: $1" ;;
	esac
done

[[ -n "$hostname" ]] || usage_error "--hostname is required"
valid_hostname "$hostname" || usage_error "invalid hostname: $hostname"
valid_name "$name" || usage_error "invalid tunnel name: $name"
valid_port "$port" || usage_error "invalid port: $port"
((${#paths[@]})) || paths=("${DEFAULT_PATHS[@]}")
for p in "${paths[@]}"; do
	[[ "$p" =~ $PATH_RE ]] || usage_error "invalid --path (must start with ^/): $p"
done
if [[ -n "$team" || ${#auds[@]} -gt 0 ]]; then
	[[ -n "$team" && ${#auds[@]} -gt 0 ]] || usage_error "Access mode needs both --access-team and --access-aud"
	[[ "$team" =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]] || usage_error "invalid --access-team: $team"
	for a in "${auds[@]}"; do
		[[ "$a" =~ ^[0-9a-f]{64}$ ]] || usage_error "invalid --access-aud (64 hex digits): $a"
	done
fi

creds="$CLOUDFLARED_ETC/$name.json"
[[ -f "$creds" ]] || die "no credentials at $creds; run tunnel-create.sh --name $name first"
id="$(tunnel_id_from_credentials "$creds")" || die "cannot read TunnelID from $creds"
valid_uuid "$id" || die "bad TunnelID in $creds: $id"
out="${out:-$CLOUDFLARED_ETC/config.yml}"
origin="http://127.0.0.1:$port"

tmp="$(mktemp "$(dirname "$out")/.config.yml.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
{
	echo "# Written by peerd scripts/cloudflared/gen-config.sh; run it again instead of editing."
	echo "tunnel: $id"
	echo "credentials-file: $creds"
	echo "# Defaults for every rule. The origin is peerd on loopback: no Happy Eyeballs, and"
	echo "# long-lived keep-alive connections for segment traffic."
	echo "originRequest:"
	echo "  connectTimeout: 10s"
	echo "  tcpKeepAlive: 30s"
	echo "  keepAliveConnections: 100"
	echo "  keepAliveTimeout: 90s"
	echo "  noHappyEyeballs: true"
	echo "ingress:"
	for p in "${paths[@]}"; do
		echo "  - hostname: $hostname"
		echo "    path: '$p'"
		echo "    service: $origin"
		if [[ -n "$team" ]]; then
			echo "    originRequest:"
			echo "      access:"
			echo "        required: true"
			echo "        teamName: $team"
			echo "        audTag:"
			for a in "${auds[@]}"; do echo "          - $a"; done
		fi
	done
	echo "  # Required catch-all: nothing else (the /ui dashboard, /metrics) leaves the machine."
	echo "  - service: http_status:404"
} >"$tmp"

if command -v "$CLOUDFLARED" >/dev/null 2>&1; then
	"$CLOUDFLARED" tunnel --config "$tmp" ingress validate >/dev/null ||
		die "cloudflared rejected the generated ingress rules"
fi
outcome="$(install_file "$tmp" "$out" 0644)"
trap - EXIT
echo "$outcome $out"
