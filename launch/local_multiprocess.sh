#!/usr/bin/env bash
# `slm train` as N processes on this machine, through the same multi-controller path as a pod:
# a JAX coordinator on 127.0.0.1, one process per "host", each with its own simulated CPU
# devices, its own rows of every batch, and its share of every checkpoint.
#
#   launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES] [-l LOGDIR] [-p PORT] -- TRAIN_ARGS...
#   launch/local_multiprocess.sh -n 2 -d 4 -- --config configs/tiny/synthetic.yaml \
#       train.steps=20 checkpoint.dir=runs/mp
#
# TRAIN_ARGS go to `slm train` unchanged. Process i writes LOGDIR/process_i.{out,err}; the
# script prints where, then waits. If any process fails, the others are stopped (they would
# otherwise wait for it in the next collective) and the failure's log tail is printed; the
# exit code is then the failed process's. SIGTERM/SIGINT are passed to every process, which
# agree on a step, save it and exit cleanly (as on a preempted pod).
# Environment: PYTHON (default python) runs `-m slm.cli`.
set -euo pipefail

processes=2
devices=4
logdir=""
port=""
while getopts "n:d:l:p:h" opt; do
  case "$opt" in
    n) processes=$OPTARG ;;
    d) devices=$OPTARG ;;
    l) logdir=$OPTARG ;;
    p) port=$OPTARG ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then shift; fi
if (($# == 0)); then
  echo "local_multiprocess.sh: give slm train's arguments after --, e.g. -- --config FILE" >&2
  exit 2
fi

python=${PYTHON:-python}
logdir=${logdir:-$(mktemp -d "${TMPDIR:-/tmp}/slm-local.XXXXXX")}
mkdir -p "$logdir"
port=${port:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

echo "local_multiprocess: $processes processes x $devices CPU devices, coordinator 127.0.0.1:$port"
echo "local_multiprocess: logs in $logdir/process_<i>.{out,err}"

declare -A index_of  # pid -> process index, for the processes still running
for ((i = 0; i < processes; i++)); do
  SLM_COORDINATOR="127.0.0.1:$port" SLM_NUM_PROCESSES=$processes SLM_PROCESS_ID=$i \
    JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices \
    "$python" -m slm.cli train "$@" >"$logdir/process_$i.out" 2>"$logdir/process_$i.err" &
  index_of[$!]=$i
  echo "local_multiprocess: process $i pid $!"
done

forward() {
  for pid in "${!index_of[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
while ((${#index_of[@]} > 0)); do
  finished=""
  set +e
  wait -n -p finished "${!index_of[@]}"
  rc=$?
  set -e
  [[ -z "$finished" ]] && continue  # a trapped signal interrupted the wait
  i=${index_of[$finished]}
  unset "index_of[$finished]"
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "local_multiprocess: process $i (pid $finished) failed with exit code $rc;" \
      "stopping the others. Tail of $logdir/process_$i.err:" >&2
    tail -n 30 "$logdir/process_$i.err" >&2
    forward KILL
  fi
done

if ((status == 0)); then
  cat "$logdir/process_0.out"
  echo "local_multiprocess: all $processes processes finished; logs in $logdir"
fi
exit "$status"
