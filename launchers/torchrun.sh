#!/usr/bin/env bash
# Train on one node with torchrun: one process per GPU.
#
#   CONFIG=launchers/configs/soda-135m.yaml bash launchers/torchrun.sh [--section.key=value ...]
#   NGPUS=4 CONFIG=... bash launchers/torchrun.sh --dry-run     # print layout + memory, exit
#
# Environment: CONFIG (required), NGPUS (default: every GPU nvidia-smi lists, else 1),
# MASTER_PORT (default 29500), PYTHON (default: .venv/bin/python when present, else python3),
# MAX_RESTARTS (default 3: restarts after a hang (exit 5) or a crash (exit 1)),
# SHUTDOWN_TIMEOUT (default 300: seconds the workers get to save after SIGTERM / SIGUSR1).
# The run resumes from the newest checkpoint in run.dir, so re-running the same command after
# a crash continues it.
#
# Exit codes (the trainer's own, which torchrun would report as 1): 0 finished, 1 crashed,
# 2 bad configuration or input (message above), 3 diverged, 4 stopped by SIGTERM / SIGUSR1
# after saving (rerun to resume), 5 a step hung (stacks in run.dir/stacks/).
# The run ends with one line saying which ("soda-mega: finished: step N", "soda-mega: stopped
# cleanly at step N (exit 4); ...", "soda-mega: stopped (exit 2): configuration error: ...");
# torchrun runs through soda_mega.parallel.torchrun, which leaves out torchrun's failure report
# for those and names the failing rank and its error for a crash.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${CONFIG:?set CONFIG=path/to/config.yaml (see launchers/configs/)}"
if [ -z "${NGPUS:-}" ]; then
  NGPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NGPUS:-0}" -gt 0 ] || NGPUS=1
fi
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# Numbers from the environment must be whole numbers (they are compared and passed on as such).
for var in NGPUS MASTER_PORT MAX_RESTARTS SHUTDOWN_TIMEOUT; do
  if [ -n "${!var:-}" ] && ! [[ ${!var} =~ ^[0-9]+$ ]]; then
    printf 'soda-mega: %s must be a whole number, got %q\n' "$var" "${!var}" >&2
    exit 2
  fi
done
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then
    exec "$PYTHON" -m soda_mega.cli train --config "$CONFIG" --world-size "$NGPUS" "$@"
  fi
done

# The trainer writes its exit code here (rank 0); torchrun turns every worker failure into 1.
SODA_MEGA_STATUS_FILE=$(mktemp "${TMPDIR:-/tmp}/soda-mega-status.XXXXXX")
export SODA_MEGA_STATUS_FILE
trap 'rm -f "$SODA_MEGA_STATUS_FILE"' EXIT

run_once() {
  : > "$SODA_MEGA_STATUS_FILE"
  # torchrun forwards SIGTERM and SIGUSR1 to the workers, which finish their step, save and
  # exit 4; it waits SHUTDOWN_TIMEOUT seconds for them before SIGKILL.
  "$PYTHON" -m soda_mega.parallel.torchrun --standalone --nproc-per-node "$NGPUS" \
    --master-port "${MASTER_PORT:-29500}" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" \
    -m soda_mega.cli train --config "$CONFIG" "$@" &
  local pid=$! rc
  # SIGTERM / SIGUSR1 sent to this script go on to torchrun (a foreground child would never see
  # them). NOTE: not SIGINT: Ctrl-C reaches torchrun from the terminal already.
  for sig in TERM USR1; do trap "stopping=1; kill -s $sig $pid 2>/dev/null" "$sig"; done
  wait "$pid"; rc=$?
  while [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done
  trap - TERM USR1
  local code
  code=$(status exit_code)
  return "${code:-$rc}"
}
# A field of the status file rank 0 wrote (exit_code, step, message).
status() { sed -n "s/^$1=//p" "$SODA_MEGA_STATUS_FILE"; }

attempt=0
stopping=0  # set when this script got SIGTERM / SIGUSR1: stop, never restart
while :; do
  export SODA_MEGA_ATTEMPT=$attempt
  run_once "$@"; code=$?
  case "$code" in
    0) echo "soda-mega: finished: step $(status step)" >&2; exit 0 ;;
    2) message=$(status message)
       echo "soda-mega: stopped (exit 2): ${message:-bad configuration or input (see the message above)}" >&2 ;;
    3) echo "soda-mega: stopped: the loss diverged at step $(status step) (exit 3; see the message above)" >&2 ;;
    4) echo "soda-mega: stopped cleanly at step $(status step) (exit 4); rerun the same command to resume" >&2 ;;
    *) if [ "$code" -eq 5 ]; then what="a step hung (Python stacks in run.dir/stacks/)";
       elif [ "$code" -gt 128 ]; then what="training was killed by signal $((code - 128))";
       else what="training crashed (exit $code)"; fi
       if [ "$stopping" -eq 0 ] && [ "$attempt" -lt "${MAX_RESTARTS:-3}" ]; then
         attempt=$((attempt + 1))
         echo "soda-mega: $what; restart $attempt of ${MAX_RESTARTS:-3} from the newest checkpoint" >&2
         continue
       fi
       if [ "$stopping" -eq 1 ]; then echo "soda-mega: $what after a stop signal; not restarted" >&2
       else echo "soda-mega: $what; no restarts left (MAX_RESTARTS=${MAX_RESTARTS:-3})" >&2; fi ;;
  esac
  exit "$code"
done
