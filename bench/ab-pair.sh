#!/usr/bin/env bash
# Two Keel builds, same sitting: the fan-out ceiling, rooms and idle RSS, with the
# builds alternating and each one first half the time, and a fresh port per run
# (a run that follows another on the same port found that run's sockets still in
# the kernel, and lost every pair). Each run is bounded; servers are stopped by PID.
#
#   bench/ab-pair.sh OLD_BIN NEW_BIN
#
# Results are printed one line a run and appended to bench/results/ab.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1 new=$2
run() { PORT=$((9500 + RANDOM % 400)) "$@"; }
pair() { # pair ORDER CMD... with NAME and BIN substituted per build
  local first=$1; shift
  local order=(old new)
  [ "$first" = new ] && order=(new old)
  for b in "${order[@]}"; do
    local bin=$old; [ "$b" = new ] && bin=$new
    run "$@" "$b" "$bin"
  done
}
fanout() { bench/ab-fanout.sh "$1" "$2" 10000 400 10s 0 1; }
rooms() { bench/ab.sh "$1" "$2" rooms --rooms 100 --per-room 10 --rate 10 --duration 10s; }
idle10() { bench/ab.sh "$1" "$2" idle --conns 10000 --hold 15s; }
idle19() { bench/ab.sh "$1" "$2" idle --conns 19000 --hold 15s; }
for first in old new old new; do pair $first fanout; done
for first in old new old; do pair $first rooms; done
for first in old new; do pair $first idle10; done
for first in old new; do pair $first idle19; done
