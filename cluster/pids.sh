# Sourced by start-local.sh and stop-local.sh: what they know of the processes in their pid files.
# shellcheck shell=bash

ours() {  # ours PID: PID runs and is a dask process. A pid file outlives a crash or a reboot, and
    # its number may since belong to another program's process, which is never signalled.
    local pid=$1 args
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r /proc/$pid/cmdline ]]; then
        args=$(tr '\0' ' ' <"/proc/$pid/cmdline")
    else
        args=$(ps -o args= -p "$pid" 2>/dev/null || true)
    fi
    [[ $args == *dask* ]]
}
