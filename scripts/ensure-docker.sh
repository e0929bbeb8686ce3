#!/usr/bin/env bash
# Make sure a Docker engine answers, with gVisor registered as the `runsc` runtime.
#
# An engine that already answers is left as it is (only runsc is registered when that is
# possible), so people with Docker installed never need more. On a fresh Debian host, as
# root, it installs docker.io, runsc, debootstrap and docker-compose, registers runsc and starts
# dockerd. With an engine already up, it still installs docker-compose when missing.
# Safe to run again: when everything is in place it returns in well under two seconds.
set -euo pipefail

readonly RUNSC=/usr/bin/runsc
# --network=none: sandboxes never get a network. --host-uds=create: the runner creates its gRPC
# socket in a bind-mounted host directory; without this flag gVisor keeps the socket inside
# the sandbox and the launcher on the host cannot connect to it. Exactly `create`: `all` (and
# `open`) would also let the sandbox connect to host sockets in its mounts, so a registration
# with them is repaired. --oci-seccomp: gVisor ignores the container's seccomp profile unless
# told to apply it inside the sandbox; without it the project's profile
# (launcher/sandbox/backend/seccomp.py) would not hold under runsc, and user namespaces (`unshare -r`),
# ptrace and mount would be open to code in the sandbox. The launcher reads the registration
# too and refuses gVisor policies when it lacks these (launcher/sandbox/backend/runtimes.py).
readonly RUNSC_FLAGS=(--network=none --host-uds=create --oci-seccomp)
readonly DOCKERD_LOG=/var/log/duckcell-dockerd.log
readonly APT_LOG=/var/log/duckcell-apt.log
readonly START_DEADLINE_S=60

say() { echo "duckcell: $*" >&2; }
die() {
	say "$*"
	exit 1
}

engine_answers() { timeout "${1:-5}" docker info >/dev/null 2>&1; }

# The engine's runsc registration as JSON ({"path":...,"runtimeArgs":[...]}); "{}" when absent.
runsc_json() {
	timeout 5 docker info --format '{{with index .Runtimes "runsc"}}{{json .}}{{end}}' \
		2>/dev/null || true
}

runsc_registered() { [[ $1 == *'"path"'* ]]; }

# The engine we would reconfigure must be the dockerd running on this host, not a remote one.
local_dockerd_pid() {
	case "${DOCKER_HOST:-unix:///var/run/docker.sock}" in
	unix:///var/run/docker.sock | unix:///run/docker.sock) pidof -s dockerd || true ;;
	*) true ;;
	esac
}

# The daemon.json a running dockerd reads: its --config-file flag, else the default.
daemon_config_of() {
	local pid=$1 arg take_next=0
	if [[ -n $pid && -r /proc/$pid/cmdline ]]; then
		while IFS= read -r -d '' arg; do
			if ((take_next)); then
				echo "$arg"
				return
			fi
			case $arg in
			--config-file=*) echo "${arg#*=}" && return ;;
			--config-file) take_next=1 ;;
			esac
		done <"/proc/$pid/cmdline"
	fi
	echo /etc/docker/daemon.json
}

# runsc's flags as its Go flag package reads them (-name or --name, =value or, but for booleans,
# the next argument; the last one wins; the first non-flag ends them), the same reading as
# launcher/sandbox/backend/runtimes.py. Defines read(args) -> {name: value} and unmet(args, wanted):
# the wanted flags that args lack or override (--host-uds=all, a later --oci-seccomp=false).
# python3 is there: duckcell itself is a Python program.
readonly RUNSC_ARGS_PY='
BOOLEAN = {"oci-seccomp"}
TRUTH = {"1": "true", "t": "true", "true": "true", "0": "false", "f": "false", "false": "false"}
def read(args, all_of_them=False):
    flags, spans, i = {}, [], 0
    while i < len(args):
        arg, start = str(args[i]), i
        if arg in ("-", "--") or not arg.startswith("-"):
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if not eq:
            if name in BOOLEAN:
                value = "true"
            elif i + 1 < len(args):
                i += 1
                value = str(args[i])
        if name in BOOLEAN:
            value = TRUTH.get(value.lower(), value)
        flags[name] = value
        spans.append((name, start, i + 1))
        i += 1
    return spans if all_of_them else flags
def unmet(args, wanted):
    flags = read(args)
    return [w for w in wanted if all(flags.get(n) != v for n, v in read([w]).items())]
'

# The flags of RUNSC_FLAGS a runsc registration ($1, from runsc_json) lacks or overrides, one
# a line.
runsc_flags_missing() {
	python3 -c "$RUNSC_ARGS_PY"'
import json, sys
try:
    entry = json.loads(sys.argv[1] or "{}")
except ValueError:
    entry = {}
print("\n".join(unmet(entry.get("runtimeArgs") or [], sys.argv[2:])))
' "$1" "${RUNSC_FLAGS[@]}" | sed '/^$/d'
}

# Adds runsc and the flags given after $1 to daemon.json, keeping everything else; a flag
# already there with another value (--host-uds=all) is replaced. Prints "changed" when it
# wrote the file.
register_runsc() {
	local config=$1
	shift
	mkdir -p "$(dirname "$config")"
	python3 -c "$RUNSC_ARGS_PY"'
import json, os, sys

path, binary, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    with open(path) as f:
        config = json.load(f)
except FileNotFoundError:
    config = {}
except ValueError as error:
    sys.exit(f"duckcell: {path} is not valid JSON ({error}); fix it, then run this again")
runtime = config.setdefault("runtimes", {}).setdefault("runsc", {"path": binary})
args = runtime.setdefault("runtimeArgs", [])
missing = unmet(args, wanted)
if not missing:
    sys.exit(0)
names = {name for flag in missing for name in read([flag])}
drop = {i for name, start, end in read(args, True) if name in names for i in range(start, end)}
args[:] = [arg for i, arg in enumerate(args) if i not in drop] + missing
if os.path.exists(path) and not os.path.exists(path + ".duckcell-backup"):
    os.link(path, path + ".duckcell-backup")
tmp = path + ".duckcell-tmp"
with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
print("changed")
' "$config" "$RUNSC" "$@"
}

# $1: the dockerd we started, if any; when it exits there is no point in waiting on.
wait_for_engine() {
	local started_pid=${1:-} deadline=$((SECONDS + START_DEADLINE_S)) problem=""
	until engine_answers 5; do
		if [[ -n $started_pid ]] && ! kill -0 "$started_pid" 2>/dev/null; then
			problem="dockerd exited"
		elif ((SECONDS >= deadline)); then
			problem="dockerd did not answer within ${START_DEADLINE_S} s"
		fi
		if [[ -n $problem ]]; then
			say "$problem; last lines of $DOCKERD_LOG:"
			tail -n 25 "$DOCKERD_LOG" >&2 || true
			exit 1
		fi
		sleep 0.5
	done
}

# After a SIGHUP dockerd reloads its runtimes; give it a moment to show runsc with every flag.
confirm_runsc() {
	local runsc _
	for _ in {1..10}; do
		runsc=$(runsc_json)
		runsc_registered "$runsc" && [[ -z $(runsc_flags_missing "$runsc") ]] && return 0
		sleep 0.3
	done
	return 1
}

# Engine already up: only try to add runsc or the flags its registration lacks, and never fail
# the caller over it. A reload (SIGHUP) is enough, no restart: dockerd 20.10+ re-reads
# `runtimes` on SIGHUP and rewrites the runsc wrapper every new container starts through, so
# running containers (other people's sandboxes, an image build) are left alone.
ensure_runsc_on_running_engine() {
	local runsc pid missing
	runsc=$(runsc_json)
	missing=$(runsc_flags_missing "$runsc")
	runsc_registered "$runsc" && [[ -z $missing ]] && return 0
	pid=$(local_dockerd_pid)
	if [[ $EUID -ne 0 || -z $pid || ! -x $RUNSC ]]; then
		if runsc_registered "$runsc"; then
			say "note: runsc is registered without ${missing//$'\n'/ } (or with another value)," \
				"so duckcell refuses gVisor policies; set them in runsc's runtimeArgs (or run sudo $0)"
		else
			say "note: the Docker engine has no runsc runtime, so gVisor policies cannot run" \
				"(to add it: sudo apt-get install runsc && sudo $0)"
		fi
		return 0
	fi
	if [[ $(register_runsc "$(daemon_config_of "$pid")" "${RUNSC_FLAGS[@]}") == changed ]]; then
		say "registered runsc with ${missing//$'\n'/ }; reloading dockerd"
	fi
	kill -HUP "$pid"
	confirm_runsc || say "note: dockerd did not pick up runsc's flags; see its log"
}

# docker-compose.yml (`make up`, tests/integration/test_compose.py) needs Compose: Debian's
# docker-compose 1.29 or the v2 plugin.
compose_present() { command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; }

missing_packages() {
	command -v dockerd >/dev/null || echo docker.io
	compose_present || echo docker-compose
	[[ -x $RUNSC ]] || echo runsc
	command -v debootstrap >/dev/null || echo debootstrap
}

install_packages() {
	local packages=("$@")
	say "installing ${packages[*]} (apt-get; log $APT_LOG) ..."
	export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
	# A fresh host may still be running its own apt jobs: wait for the lock, do not fail.
	if ! {
		apt-get -o DPkg::Lock::Timeout=120 update -q &&
			apt-get -o DPkg::Lock::Timeout=120 install -y -q "${packages[@]}"
	} >>"$APT_LOG" 2>&1; then
		tail -n 20 "$APT_LOG" >&2
		die "apt-get could not install ${packages[*]} (last lines above)"
	fi
}

# With an engine already up: install Compose too when root can, else say how.
ensure_compose() {
	compose_present && return 0
	if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
		say "note: no docker-compose, so \`make up\` and the compose tests cannot run" \
			"(sudo apt-get install docker-compose, or install Compose v2)"
		return 0
	fi
	install_packages docker-compose
}

main() {
	if command -v docker >/dev/null && engine_answers 5; then
		ensure_runsc_on_running_engine
		ensure_compose
		exit 0
	fi
	if [[ $EUID -ne 0 ]]; then
		# (Captured first: under pipefail, docker's own failure would hide grep's match.)
		local answer
		answer=$(timeout 5 docker info 2>&1 || true)
		if [[ $answer == *"permission denied"* ]]; then
			die "a Docker engine runs but $(id -un) may not use it: join the docker group" \
				"(sudo usermod -aG docker $(id -un), then log in again) or use sudo"
		fi
		die "no Docker engine answers and installing one needs root: run sudo $0" \
			"(or start your Docker engine / set DOCKER_HOST)"
	fi
	command -v apt-get >/dev/null ||
		die "no Docker engine answers and this host has no apt-get: install and start" \
			"Docker (with gVisor's runsc) yourself, then run this again"

	local missing
	mapfile -t missing < <(missing_packages)
	((${#missing[@]} == 0)) || install_packages "${missing[@]}"

	local pid config changed started_pid=""
	pid=$(pidof -s dockerd || true)
	config=$(daemon_config_of "$pid")
	changed=$(register_runsc "$config" "${RUNSC_FLAGS[@]}")
	[[ $changed != changed ]] || say "registered runsc in $config"

	if [[ -n $pid ]]; then
		# A dockerd that runs but does not answer yet is starting up; a reload is enough.
		[[ $changed != changed ]] || kill -HUP "$pid"
		say "waiting for the running dockerd (pid $pid) ..."
	else
		say "starting dockerd (log $DOCKERD_LOG) ..."
		# setsid + nohup: the engine must outlive this script and the CI step that ran it.
		setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
		started_pid=$!
		disown
	fi
	wait_for_engine "$started_pid"
	confirm_runsc || die "dockerd answers but does not list runsc; check $config and $DOCKERD_LOG"
	say "Docker engine ready: $(docker info --format \
		'{{.ServerVersion}}, runtimes:{{range $name, $_ := .Runtimes}} {{$name}}{{end}}')"
}

main "$@"
