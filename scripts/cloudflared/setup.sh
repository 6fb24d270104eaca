#!/usr/bin/env bash
# Publish this peerd node through a Cloudflare Tunnel in one go: create the tunnel, route
# HOSTNAME to it, write config.yml, run cloudflared as a service. Every step is idempotent, so
# running it again (say, with another --path or Access mode) only changes what differs.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=lib.sh
source "$here/lib.sh"

usage() {
	cat <<USAGE
usage: ${0##*/} HOSTNAME [--name NAME] [--port PORT] [--path REGEX]...
                [--access-team TEAM --access-aud TAG] [--overwrite-dns] [--no-service]

Runs tunnel-create.sh, route-dns.sh, gen-config.sh and install-service.sh in order; see each
for the options. --no-service stops after writing config.yml.
USAGE
}

hostname="" name="$DEFAULT_TUNNEL_NAME" service=1
gen_args=() dns_args=()
while (($#)); do
	case "$1" in
	--name) [[ $# -ge 2 ]] || usage_error "--name needs a value"; name="$2"; shift 2 ;;
	--port | --path | --access-team | --access-aud)
		[[ $# -ge 2 ]] || usage_error "$1 needs a value"
		gen_args+=("$1" "$2")
		shift 2
		;;
	--overwrite-dns) dns_args+=(--overwrite-dns); shift ;;
	--no-service) service=0; shift ;;
	-h | --help) usage; exit 0 ;;
	-*) usage_error "unknown option: $1" ;;
	*) [[ -z "$hostname" ]] || usage_error "one hostname only"; hostname="$1"; shift ;;
	esac
done
[[ -n "$hostname" ]] || usage_error "HOSTNAME is required"
valid_hostname "$hostname" || usage_error "invalid hostname: $hostname"

"$here/tunnel-create.sh" --name "$name" >/dev/null
"$here/route-dns.sh" --name "$name" "${dns_args[@]}" "$hostname"
result="$("$here/gen-config.sh" --name "$name" --hostname "$hostname" "${gen_args[@]}")"
log "config: $result"
if ((service)); then
	restart=()
	[[ "$result" == kept* ]] || restart=(--restart)
	"$here/install-service.sh" "${restart[@]}"
fi
log "done: https://$hostname/ is served by this node (set [node] public_url to it)"
