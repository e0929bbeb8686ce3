#!/usr/bin/env bash
# `make up` and `make down` for docker-compose.yml (docs/deploy.md).
#
#   deploy/compose.sh up     compose up -d, wait until both services are healthy, write the CA
#                            to .duckcell/ca.pem and print how to connect
#   deploy/compose.sh down   compose down (volumes kept; DUCKCELL_DOWN_VOLUMES=1 removes them),
#                            then removes any sandbox the worker could not (a killed worker)
#
# Compose: Debian's docker-compose 1.29 or `docker compose` (v2), whichever is installed.
# Project name: COMPOSE_PROJECT_NAME, default duckcell.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly PROJECT=${COMPOSE_PROJECT_NAME:-duckcell}
readonly HEALTH_DEADLINE_S=180

say() { echo "duckcell: $*" >&2; }
die() {
	say "$*"
	exit 1
}

if command -v docker-compose >/dev/null; then
	compose=(docker-compose -p "$PROJECT")
elif docker compose version >/dev/null 2>&1; then
	compose=(docker compose -p "$PROJECT")
else
	die "no docker-compose: sudo apt-get install docker-compose (or install Compose v2)"
fi

health() {
	local id
	id=$("${compose[@]}" ps -q "$1")
	[[ -n $id ]] || {
		echo missing
		return
	}
	docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id"
}

# The label of the worker's sandboxes: launcher/cli/worker.py hashes the engine's path of the
# state volume the same way.
sandbox_label() {
	local mountpoint
	mountpoint=$(docker volume inspect -f '{{.Mountpoint}}' "${PROJECT}_worker-state" 2>/dev/null) ||
		return 0
	echo "duckcell.launcher=container-$(printf %s "$mountpoint" | sha256sum | cut -c1-12)"
}

up() {
	"${compose[@]}" up -d
	local deadline=$((SECONDS + HEALTH_DEADLINE_S)) service state
	for service in controlplane worker; do
		while state=$(health "$service") && [[ $state != healthy ]]; do
			if [[ $state =~ ^(exited|dead|missing)$ ]] || ((SECONDS > deadline)); then
				"${compose[@]}" logs --tail=20 "$service" >&2 || true
				die "$service is $state, not healthy (its last log lines above)"
			fi
			sleep 1
		done
	done
	mkdir -p .duckcell
	"${compose[@]}" exec -T controlplane duckcell controlplane ca >.duckcell/ca.pem
	local key query_port flight_port
	key=$("${compose[@]}" exec -T controlplane cat /var/lib/duckcell-controlplane/first-api-key)
	key=${key//$'\r'/}
	query_port=$("${compose[@]}" port controlplane 7443 | cut -d: -f2)
	flight_port=$("${compose[@]}" port controlplane 7445 | cut -d: -f2)
	cat <<-EOT

		duckcell is up (project $PROJECT): control plane and worker healthy.
		  CA certificate:  .duckcell/ca.pem
		  API key:         $key   (role default; again: ${compose[*]} exec controlplane cat /var/lib/duckcell-controlplane/first-api-key)

		ADBC (Python: pip install adbc-driver-flightsql):
		  import adbc_driver_flightsql.dbapi as flightsql
		  conn = flightsql.connect("grpc+tls://127.0.0.1:$flight_port", db_kwargs={
		      "adbc.flight.sql.client_option.tls_root_certs": open(".duckcell/ca.pem").read(),
		      "adbc.flight.sql.authorization_header": "Bearer $key"}, autocommit=True)
		  cursor = conn.cursor(); cursor.execute("SELECT count(*) FROM trips"); print(cursor.fetchall())

		duckcell CLI:
		  duckcell query --control-plane 127.0.0.1:$query_port --ca-file .duckcell/ca.pem --api-key $key "SELECT pickup_zone, count(*) FROM trips GROUP BY 1"

		Stop: make down (volumes kept; make down VOLUMES=1 removes them).
	EOT
}

down() {
	local label
	label=$(sandbox_label)
	local flags=(--timeout 60)
	[[ ${DUCKCELL_DOWN_VOLUMES:-0} == 1 ]] && flags+=(-v)
	"${compose[@]}" down "${flags[@]}"
	if [[ -n $label ]]; then
		local left
		left=$(docker ps -aq --filter "label=$label")
		if [[ -n $left ]]; then
			say "removing $(wc -w <<<"$left") sandbox(es) a stopped worker left behind"
			docker rm -f $left >/dev/null
		fi
	fi
}

case ${1:-} in
up) up ;;
down) down ;;
*) die "usage: $0 up|down" ;;
esac
