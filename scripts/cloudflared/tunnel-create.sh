#!/usr/bin/env bash
# Create (or find) the named Cloudflare Tunnel for this node and keep its credentials file in
# $CLOUDFLARED_ETC/<name>.json (0600). Idempotent: an existing tunnel is reused, and a missing
# credentials file for it is fetched again with `cloudflared tunnel token --cred-file`.
# Prints the tunnel id on stdout.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
	cat <<USAGE
usage: ${0##*/} [--name NAME]

  --name NAME   tunnel name (default: $DEFAULT_TUNNEL_NAME)

Needs \`cloudflared tunnel login\` done once (origin certificate at \$TUNNEL_ORIGIN_CERT).
USAGE
}

name="$DEFAULT_TUNNEL_NAME"
while (($#)); do
	case "$1" in
	--name) [[ $# -ge 2 ]] || usage_error "--name needs a value"; name="$2"; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) usage_error "unknown argument: $1" ;;
	esac
done
valid_name "$name" || usage_error "invalid tunnel name: $name"

require_cloudflared
require_login
install -d -m 0755 "$CLOUDFLARED_ETC"
creds="$CLOUDFLARED_ETC/$name.json"

id="$(tunnel_id_by_name "$name")"
if [[ -z "$id" ]]; then
	[[ ! -e "$creds" ]] || die "$creds exists but no tunnel is called $name; move it away first"
	json="$("$CLOUDFLARED" tunnel create --output json --credentials-file "$creds" "$name")" ||
		die "cloudflared tunnel create failed"
	id="$(printf '%s' "$json" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')"
	log "created tunnel $name ($id)"
elif [[ ! -f "$creds" ]]; then
	"$CLOUDFLARED" tunnel token --cred-file "$creds" "$id" >/dev/null ||
		die "tunnel $name exists but its credentials could not be fetched into $creds"
	log "tunnel $name ($id) exists; fetched its credentials"
else
	log "tunnel $name ($id) exists; credentials kept"
fi
valid_uuid "$id" || die "cloudflared returned an unexpected tunnel id: $id"
[[ -f "$creds" ]] || die "cloudflared wrote no credentials file at $creds"
chmod 0600 "$creds"
[[ "$(tunnel_id_from_credentials "$creds")" == "$id" ]] ||
	die "$creds belongs to another tunnel than $name ($id)"
echo "$id"
