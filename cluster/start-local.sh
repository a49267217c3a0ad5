#!/usr/bin/env bash
# Start a Dask cluster on this machine in the background: one scheduler with the parameter
# server preloaded (`dask scheduler --preload pipeline.ps`) and N single-threaded workers.
#
#   cluster/start-local.sh [options]
#
#   -n, --workers N         worker processes (default 2)
#   --threads T             threads per worker process (default 1; see cluster/README.md)
#   --memory-limit M        memory limit per worker process (default auto)
#   --host H                address to listen on (default 127.0.0.1)
#   --port P                scheduler port (default 8786; 0 = a free port)
#   --dashboard-port P      dashboard port (default 8787; 0 = a free port)
#   --tls                   use tls:// with the certificates in --certs (made by
#                           cluster/make-tls-certs.sh if the directory has none)
#   --certs DIR             certificate directory (default RUN_DIR/certs)
#   --run-dir DIR           pid files, logs and scheduler.json (default cluster/.run)
#
# Stop it with cluster/stop-local.sh (same --run-dir). Logs: RUN_DIR/scheduler.log and
# RUN_DIR/workers.log. The dask and pipeline commands are taken from .venv/bin if it exists,
# else from PATH; DASK_CONFIG and the other DASK_* variables are passed through.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
workers=2 threads=1 memory=auto host=127.0.0.1 port=8786 dport=8787 tls=0 certs="" run="$here/.run"

die() { echo "error: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
    case $1 in
        -n|--workers) workers=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --memory-limit) memory=$2; shift 2 ;;
        --host) host=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --dashboard-port) dport=$2; shift 2 ;;
        --tls) tls=1; shift ;;
        --certs) certs=$2; shift 2 ;;
        --run-dir) run=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ $workers =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer"
[[ $threads =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer"

if [[ -x "$root/.venv/bin/dask" ]]; then bin="$root/.venv/bin/"; else bin=""; fi
command -v "${bin}dask" >/dev/null || die "the dask command was not found (activate the virtualenv)"

# shellcheck source=cluster/pids.sh
source "$here/pids.sh"

mkdir -p "$run"
run=$(cd "$run" && pwd)
for f in "$run"/scheduler.pid "$run"/workers.pid; do
    if [[ -f $f ]] && ours "$(cat "$f")"; then
        die "a cluster is already running from $run (pid $(cat "$f")); stop it with cluster/stop-local.sh --run-dir $run"
    fi
done
rm -f "$run"/scheduler.pid "$run"/workers.pid "$run"/scheduler.json

tls_args=()
proto=tcp
if [[ $tls == 1 ]]; then
    proto=tls
    certs=${certs:-$run/certs}
    [[ -f $certs/ca.pem ]] || "$here/make-tls-certs.sh" "$certs" localhost "$host" >/dev/null
    certs=$(cd "$certs" && pwd)
fi
tls_for() {  # tls_for ROLE: the --tls-* options of ROLE
    [[ $tls == 1 ]] && echo "--tls-ca-file $certs/ca.pem --tls-cert $certs/$1.pem --tls-key $certs/$1-key.pem"
    return 0
}

# Each process gets its own session (setsid) so that stop-local.sh can end its whole group.
# shellcheck disable=SC2046  # word splitting of $(tls_for ...) is intended
setsid "${bin}dask" scheduler --preload pipeline.ps --protocol "$proto" --host "$host" --port "$port" \
    --dashboard-address "$host:$dport" --scheduler-file "$run/scheduler.json" $(tls_for scheduler) \
    >"$run/scheduler.log" 2>&1 </dev/null &
echo $! >"$run/scheduler.pid"

for _ in $(seq 100); do
    [[ -s $run/scheduler.json ]] && break
    kill -0 "$(cat "$run/scheduler.pid")" 2>/dev/null || { tail -20 "$run/scheduler.log" >&2; die "the scheduler exited (log: $run/scheduler.log)"; }
    sleep 0.2
done
[[ -s $run/scheduler.json ]] || die "the scheduler did not start within 20 s (log: $run/scheduler.log)"
read -r address dash < <("${bin}python" -c 'import json, sys
d = json.load(open(sys.argv[1]))
print(d["address"], d.get("services", {}).get("dashboard", ""))' "$run/scheduler.json" 2>/dev/null ||
    python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
print(d["address"], d.get("services", {}).get("dashboard", ""))' "$run/scheduler.json")

# shellcheck disable=SC2046
setsid "${bin}dask" worker "$address" --nworkers "$workers" --nthreads "$threads" \
    --memory-limit "$memory" --host "$host" --dashboard-address "$host:0" $(tls_for worker) \
    >"$run/workers.log" 2>&1 </dev/null &
echo $! >"$run/workers.pid"

for _ in $(seq 300); do
    n=$(grep -c "Register worker" "$run/scheduler.log" || true)
    [[ $n -ge $workers ]] && break
    kill -0 "$(cat "$run/workers.pid")" 2>/dev/null || { tail -20 "$run/workers.log" >&2; die "the workers exited (log: $run/workers.log)"; }
    sleep 0.2
done
[[ ${n:-0} -ge $workers ]] || echo "warning: only ${n:-0} of $workers workers registered after 60 s (log: $run/workers.log)" >&2

echo "scheduler: $address"
echo "dashboard: http://$host:$dash/status  (training page: http://$host:$dash/pipeline)"
echo "workers:   $workers x $threads thread(s)"
if [[ $tls == 1 ]]; then
    echo "train:     ${bin}pipeline train STORE --scheduler $address --tls-ca-file $certs/ca.pem --tls-cert $certs/client.pem --tls-key $certs/client-key.pem"
else
    echo "train:     ${bin}pipeline train STORE --scheduler $address"
fi
echo "stop:      $here/stop-local.sh --run-dir $run"
