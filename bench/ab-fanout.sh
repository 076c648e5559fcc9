#!/usr/bin/env bash
# One `keel-bench fanout` against one server binary (or Bun), for A/B runs of two
# builds alternating in one sitting, which bench/run.sh (one build, every peer)
# does not do. Prints one line: delivered/s, loss, server CPU and CPU s per
# million deliveries, load generator CPU, p99. Bounded: one scenario of DURATION,
# then the server is stopped by PID.
#
#   bench/ab-fanout.sh NAME BIN|bun SUBS RATE [DURATION] [SERVER_CORES] [LOADGEN_CORES]
#   bench/ab-fanout.sh old /tmp/keel-old 10000 100 10s     # server core 0, load core 1
#   bench/ab-fanout.sh two ./target/release/keel 10000 300 8s 0,1 0,1
#
# KB picks the keel-bench binary (default ./target/release/keel-bench), KB_ARGS
# adds options to it (e.g. "--size 250"); results are appended to
# bench/results/ab.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 bin=$2 subs=$3 rate=$4 dur=${5:-10s} sc=${6:-0} lc=${7:-1}
port=${PORT:-9300}
ulimit -n 20000 2>/dev/null || true
mkdir -p bench/results
if [ "$bin" = bun ]; then
  PORT=$port taskset -c "$sc" bench/peers/node_modules/.bin/bun bench/peers/bun/server.ts >"/tmp/ab-$name.log" 2>&1 &
  proto=trivial
else
  KEEL_API_KEY=bench KEEL_LOG_LEVEL=warn KEEL_RATE_LIMIT_MESSAGES=0 taskset -c "$sc" "$bin" serve --listen 127.0.0.1:$port >"/tmp/ab-$name.log" 2>&1 &
  proto=keel
fi
pid=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
status=0
taskset -c "$lc" "${KB:-./target/release/keel-bench}" fanout --addr 127.0.0.1:$port --protocol $proto \
  --pid $pid --label "$name" --json bench/results/ab.jsonl --subs "$subs" --rate "$rate" \
  --duration "$dur" ${KB_ARGS:-} >"/tmp/ab-$name.out" 2>&1 || status=$?
kill -TERM $pid 2>/dev/null || true
for _ in $(seq 1 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
kill -KILL $pid 2>/dev/null || true
[ $status = 0 ] || { echo "$name: keel-bench failed ($status), see /tmp/ab-$name.out"; exit $status; }
tail -1 bench/results/ab.jsonl | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(d["label"], "delivered/s=%.0f" % d["deliveries_per_s"], "loss=%s" % d.get("loss"), "cpu=%.1f%%" % d["server_cpu_pct"], "s/M=%.3f" % d["server_cpu_s_per_million_deliveries"], "loadgen=%.0f%%" % d["loadgen_cpu_pct"], "p99_us=%s" % d["latency_us"]["p99"], d.get("note") or "")'
