#!/usr/bin/env bash
# Run cloudflared as a systemd service with $CLOUDFLARED_ETC/config.yml. Idempotent: the first
# run uses `cloudflared service install` (which writes and starts cloudflared.service); later
# runs only make sure the service is enabled and running, and restart it with --restart (after
# the config changed).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
	cat <<USAGE
usage: ${0##*/} [--restart]

  --restart   restart an installed service (to pick up a new config.yml)
USAGE
}

restart=0
while (($#)); do
	case "$1" in
	--restart) restart=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage_error "unknown argument: $1" ;;
	esac
done

require_cloudflared
config="$CLOUDFLARED_ETC/config.yml"
[[ -f "$config" ]] || die "no $config; run gen-config.sh first"
unit="$SYSTEMD_UNIT_DIR/cloudflared.service"
if [[ ! -f "$unit" ]]; then
	"$CLOUDFLARED" --config "$config" service install || die "cloudflared service install failed"
	log "installed and started cloudflared.service"
else
	if ! "$SYSTEMCTL" is-enabled --quiet cloudflared.service; then
		"$SYSTEMCTL" enable cloudflared.service
		log "enabled cloudflared.service"
	fi
	if ((restart)); then
		"$SYSTEMCTL" restart cloudflared.service
		log "restarted cloudflared.service"
	elif ! "$SYSTEMCTL" is-active --quiet cloudflared.service; then
		"$SYSTEMCTL" start cloudflared.service
		log "started cloudflared.service"
	else
		log "cloudflared.service is installed and running"
	fi
fi
