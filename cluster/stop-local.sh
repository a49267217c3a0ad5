#!/usr/bin/env bash
# Stop the cluster started by cluster/start-local.sh: the workers first (so they do not try to
# reconnect), then the scheduler. Each is asked to shut down (SIGTERM to its process group,
# which also reaches the worker processes its nannies spawned) and killed after a grace period.
#
#   cluster/stop-local.sh [--run-dir DIR] [--grace SECONDS]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
run="$here/.run" grace=15
while [[ $# -gt 0 ]]; do
    case $1 in
        --run-dir) run=$2; shift 2 ;;
        --grace) grace=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 1 ;;
    esac
done

# shellcheck source=cluster/pids.sh
source "$here/pids.sh"

stopped=0
stop() {  # stop NAME: end the process group recorded in RUN/NAME.pid
    local file="$run/$1.pid" pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && ! ours "$pid"; then
        echo "$1: pid $pid in $file is no longer a dask process (the cluster ended without stop-local.sh); left alone" >&2
    elif ours "$pid"; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq $((grace * 5))); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 -- "-$pid" 2>/dev/null; then
            echo "$1 (pid $pid) did not stop within ${grace} s: killing it" >&2
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
        echo "stopped $1 (pid $pid)"
        stopped=1
    fi
    rm -f "$file"
}

stop workers
stop scheduler
rm -f "$run/scheduler.json"
[[ $stopped == 1 ]] || echo "no cluster running from $run"
