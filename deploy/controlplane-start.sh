#!/bin/sh
# The `controlplane` service of docker-compose.yml. On its first start (an empty data volume)
# it applies the sample catalog and creates the first user's API key (role `default`), kept in
# the data volume: `docker compose exec controlplane cat /var/lib/duckcell-controlplane/first-api-key`.
# Whenever the enrollment volume holds no token it writes a one-time one there, for the worker
# service (the only other container that mounts it). Then it serves: enrollment and the Query
# service on 7443, the workers' tunnel on 7444, Flight SQL on 7445, with a certificate valid for
# localhost, 127.0.0.1 and the service name.
set -eu
data=${DUCKCELL_CONTROLPLANE_DATA:-/var/lib/duckcell-controlplane}
enroll=${DUCKCELL_ENROLL_DIR:-/run/duckcell-enroll}
first_key="$data/first-api-key"
umask 077

if [ ! -s "$first_key" ]; then
	duckcell controlplane catalog apply /opt/duckcell/app/deploy/catalog.yaml
	duckcell controlplane apikey create --role default >"$first_key.tmp"
	mv "$first_key.tmp" "$first_key"
	echo "duckcell: first start: sample catalog applied, first API key in $first_key" >&2
fi
if [ ! -s "$enroll/token" ]; then
	duckcell controlplane token create --ttl "${DUCKCELL_ENROLL_TTL:-24h}" >"$enroll/token.tmp"
	mv "$enroll/token.tmp" "$enroll/token"
	echo "duckcell: a one-time enrollment token for the worker is in $enroll/token" >&2
fi
exec duckcell controlplane serve --listen 0.0.0.0:7443 --tunnel-listen 0.0.0.0:7444 \
	--flight-listen 0.0.0.0:7445 --host localhost --host 127.0.0.1 --host controlplane \
	${DUCKCELL_CONTROLPLANE_HOSTS:-} "$@"
