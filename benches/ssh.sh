#!/usr/bin/env bash
# Measures how long ringleader's ssh transport takes to run 8 ranks on one
# host, against one plain `ssh host true` to the same host, in the same run.
#
# Starts a private sshd on a free 127.0.0.1 port (generated keys, strict host
# key checking), builds `ssh-launch` in release mode, and runs hyperfine.
# Needs: openssh-server, openssh-client, hyperfine, python3, cargo.
# Usage: benches/ssh.sh [RUNS]   (default 30)
set -euo pipefail

runs=${1:-30}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/ringleader-bench-ssh.XXXXXX")
sshd_pids=''
cleanup() {
  for pid in $sshd_pids; do kill "$pid" 2>/dev/null || true; done
  rm -rf -- "$work"
}
trap cleanup EXIT

for key in host_key client_key; do
  ssh-keygen -q -t ed25519 -N '' -C ringleader-bench -f "$work/$key"
done
cp "$work/client_key.pub" "$work/authorized_keys"
user=$(id -un)
mkdir -p "$work/clean-home"

# start_sshd NAME EXTRA_CONFIG: starts an sshd and adds Host NAME to ssh_config.
start_sshd() {
  local name=$1 extra=$2 port pid
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cat > "$work/sshd_config.$name" <<CONFIG
Port $port
ListenAddress 127.0.0.1
HostKey $work/host_key
AuthorizedKeysFile $work/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
PrintMotd no
PermitRootLogin prohibit-password
AllowUsers $user
$extra
CONFIG
  echo "[127.0.0.1]:$port $(cat "$work/host_key.pub")" >> "$work/known_hosts"
  cat >> "$work/ssh_config" <<CONFIG
Host $name
  HostName 127.0.0.1
  Port $port
  User $user
  IdentityFile $work/client_key
  IdentitiesOnly yes
  IdentityAgent none
  UserKnownHostsFile $work/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
CONFIG
  /usr/sbin/sshd -D -f "$work/sshd_config.$name" -E "$work/sshd.$name.log" &
  pid=$!
  sshd_pids="$sshd_pids $pid"
  for _ in $(seq 100); do
    grep -q 'Server listening' "$work/sshd.$name.log" 2>/dev/null && return 0
    sleep 0.05
  done
  cat "$work/sshd.$name.log" >&2
  exit 1
}

if [ "$(id -u)" -eq 0 ]; then mkdir -p /run/sshd; fi
# "user-home": sessions start the user's login shell with the user's own
# startup files, as on a real cluster. "clean-home": HOME points at an
# empty directory, so the login shell reads no startup files. This
# isolates the transport's cost from the remote shell's.
start_sshd user-home ''
start_sshd clean-home "SetEnv HOME=$work/clean-home"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
(cd "$repo" && cargo build --quiet --release -p ringleader-tests --bin ssh-launch)
launch="$CARGO_TARGET_DIR/release/ssh-launch"

echo "machine: $(nproc) cores, $(uname -sr), $(ssh -V 2>&1)"
for host in clean-home user-home; do
  hyperfine --warmup 3 --runs "$runs" --export-json "$work/result.$host.json" \
    --command-name "$host: ssh true" "ssh -F $work/ssh_config $host true" \
    --command-name "$host: ssh-launch 8 ranks of true" "$launch --config $work/ssh_config $host 8 true >/dev/null"
  python3 - "$work/result.$host.json" "$host" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
single, launch = (r["mean"] for r in results)
print(f"{sys.argv[2]}: ratio (8 ranks / single ssh): {launch / single:.2f} (target <= 1.5)")
PY
done

# Teardown: SIGKILL ssh-launch while 3 ranks sleep, then time until no
# process of their groups is left on the "remote" side (zombies count as gone).
group_alive() {
  ps -A -o pgid= -o stat= | awk -v group="$1" '$1 == group && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}
for trial in 1 2 3 4 5; do
  "$launch" --config "$work/ssh_config" clean-home 3 sh -c 'sleep 300 & sleep 300 & wait' > "$work/launch.out" &
  launcher_pid=$!
  for _ in $(seq 200); do
    [ "$(grep -c started "$work/launch.out")" -ge 3 ] && break
    sleep 0.05
  done
  groups=$(awk '/^started/ { print $3 }' "$work/launch.out")
  sleep 0.5
  start=$(date +%s%N)
  kill -KILL "$launcher_pid"
  wait "$launcher_pid" 2>/dev/null || true
  for _ in $(seq 2000); do
    left=''
    for group in $groups; do group_alive "$group" && left=1; done
    [ -z "$left" ] && break
    sleep 0.01
  done
  echo "teardown trial $trial: remote groups gone $(( ($(date +%s%N) - start) / 1000000 )) ms after SIGKILL of the launcher${left:+ (NOT GONE)}"
done
