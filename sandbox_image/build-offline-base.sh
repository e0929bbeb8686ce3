#!/usr/bin/env bash
# Build the sandbox's base image without any container registry: a minimal Debian bookworm
# root filesystem with Debian's python3 (3.11, the version the sandbox wheels are built for),
# made by debootstrap from the Debian mirror and imported into the local Docker engine.
#
# The image builder runs this only when python:3.11-slim is neither present nor pullable.
# Usage: sudo sandbox_image/build-offline-base.sh [TAG]     (default duckcell-base:bookworm)
# Env:   DUCKCELL_DEBIAN_MIRROR (default http://deb.debian.org/debian)
set -euo pipefail

readonly TAG=${1:-duckcell-base:bookworm}
readonly SUITE=bookworm
readonly MIRROR=${DUCKCELL_DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "duckcell-base: $*" >&2; }
die() {
	say "error: $*"
	exit 1
}

[[ $EUID -eq 0 ]] || die "debootstrap needs root; run: sudo $0"
command -v debootstrap >/dev/null ||
	die "debootstrap is missing; run: sudo apt-get install debootstrap (or sudo scripts/ensure-docker.sh)"
command -v docker >/dev/null || die "the docker CLI is missing; run: sudo scripts/ensure-docker.sh"
timeout 10 docker info >/dev/null 2>&1 ||
	die "no Docker engine answers; run: sudo scripts/ensure-docker.sh"

# /var/tmp rather than /tmp: the tree is ~250 MB and /tmp is often a small tmpfs.
work=$(mktemp -d "${TMPDIR:-/var/tmp}/duckcell-base.XXXXXX")
root="$work/rootfs"
log="$work/debootstrap.log"

cleanup() {
	# debootstrap mounts /proc and /sys inside the target and can leave them behind when it
	# fails; unmount first, and never let rm cross into a mounted host filesystem.
	local mnt
	for mnt in "$root/proc" "$root/sys" "$root/dev/pts"; do
		if mountpoint -q "$mnt" 2>/dev/null; then umount -l "$mnt" || true; fi
	done
	rm -rf --one-file-system "$work"
}
trap cleanup EXIT

started=$SECONDS
say "debootstrap $SUITE (minbase + python3) from $MIRROR; takes a few minutes"
if ! debootstrap --variant=minbase --include=python3,ca-certificates \
	"$SUITE" "$root" "$MIRROR" >"$log" 2>&1; then
	tail -n 20 "$log" >&2
	die "debootstrap failed (last lines above)"
fi
say "root filesystem ready after $((SECONDS - started)) s; stripping docs, manuals, locales, apt lists"

# Nothing in a sandbox reads documentation or translations, and apt never runs there.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
	"$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
	"$root"/usr/share/locale/* "$root"/var/log/*
# Keep only the C locales (Python's UTF-8 mode needs nothing more).
find "$root/usr/lib/locale" -mindepth 1 -maxdepth 1 ! -name 'C.*' -exec rm -rf {} + 2>/dev/null ||
	true

say "importing as $TAG"
tar -C "$root" --numeric-owner -c . |
	docker import \
		--change 'LABEL duckcell.image=base' \
		--change "LABEL duckcell.base.suite=$SUITE" \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'ENV LANG=C.UTF-8' \
		--change 'CMD ["python3"]' \
		--message "duckcell offline base: debootstrap $SUITE minbase + python3" \
		- "$TAG" >/dev/null
docker run --rm --network none "$TAG" python3 -c 'import json, ssl' ||
	die "the imported image $TAG cannot run python3"
say "$TAG ready in $((SECONDS - started)) s"
