#!/usr/bin/env bash
# Point HOSTNAME (a CNAME in a zone of your Cloudflare account) at the node's tunnel.
# Idempotent: cloudflared reports a route that is already in place and changes nothing.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
	cat <<USAGE
usage: ${0##*/} [--name NAME] [--overwrite-dns] HOSTNAME

  --name NAME       tunnel name (default: $DEFAULT_TUNNEL_NAME)
  --overwrite-dns   replace an existing DNS record for HOSTNAME that points elsewhere
USAGE
}

name="$DEFAULT_TUNNEL_NAME"
overwrite=()
hostname=""
while (($#)); do
	case "$1" in
	--name) [[ $# -ge 2 ]] || usage_error "--name needs a value"; name="$2"; shift 2 ;;
	--overwrite-dns) overwrite=(--overwrite-dns); shift ;;
	-h | --help) usage; exit 0 ;;
	-*) usage_error "unknown option: $1" ;;
	*) [[ -z "$hostname" ]] || usage_error "one hostname only"; hostname="$1"; shift ;;
	esac
done
[[ -n "$hostname" ]] || usage_error "HOSTNAME is required"
valid_hostname "$hostname" || usage_error "invalid hostname: $hostname"
valid_name "$name" || usage_error "invalid tunnel name: $name"

require_cloudflared
require_login
id="$(tunnel_id_by_name "$name")"
[[ -n "$id" ]] || die "no tunnel called $name; run tunnel-create.sh first"
"$CLOUDFLARED" tunnel route dns "${overwrite[@]}" "$id" "$hostname" ||
	die "routing $hostname to tunnel $name failed (an existing record? see --overwrite-dns)"
log "$hostname routes to tunnel $name ($id)"
