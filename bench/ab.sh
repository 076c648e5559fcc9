#!/usr/bin/env bash
# One keel-bench scenario against one Keel server binary, for A/B runs of two
# builds alternating in one sitting (ab-fanout.sh is the fan-out special case with
# Bun as a possible peer). Prints one line with the scenario's headline figures.
# Bounded: one scenario, then the server is stopped by PID.
#
#   bench/ab.sh NAME BIN SCENARIO [keel-bench options...]
#   bench/ab.sh new ./target/release/keel rooms --rooms 100 --per-room 10 --rate 10 --duration 10s
#   bench/ab.sh old /tmp/keel-old idle --conns 10000 --hold 20s
#
# The server runs on core SERVER_CORES (default 0), the load on LOADGEN_CORES
# (default 1); KB picks the keel-bench binary (default ./target/release/keel-bench);
# results are appended to bench/results/ab.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 bin=$2 scenario=$3
shift 3
sc=${SERVER_CORES:-0} lc=${LOADGEN_CORES:-1}
port=${PORT:-9310}
ulimit -n 20000 2>/dev/null || true
mkdir -p bench/results
KEEL_API_KEY=bench KEEL_LOG_LEVEL=warn KEEL_RATE_LIMIT_MESSAGES=0 taskset -c "$sc" "$bin" serve --listen 127.0.0.1:$port >"/tmp/ab-$name.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
status=0
taskset -c "$lc" "${KB:-./target/release/keel-bench}" "$scenario" --addr 127.0.0.1:$port --protocol keel \
  --pid $pid --label "$name" --json bench/results/ab.jsonl "$@" >"/tmp/ab-$name.out" 2>&1 || status=$?
kill -TERM $pid 2>/dev/null || true
for _ in $(seq 1 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
kill -KILL $pid 2>/dev/null || true
[ $status = 0 ] || { echo "$name: keel-bench failed ($status), see /tmp/ab-$name.out"; exit $status; }
tail -1 bench/results/ab.jsonl | python3 -c '
import json, sys
d = json.loads(sys.stdin.read())
keys = ["deliveries_per_s", "server_cpu_s_per_million_deliveries", "server_cpu_pct",
        "loadgen_cpu_pct", "rss_per_connection_bytes", "still_open", "loss"]
out = [d["label"], d["scenario"]]
for k in keys:
    if d.get(k) is not None:
        v = d[k]
        out.append("%s=%s" % (k, ("%.3f" % v) if isinstance(v, float) else v))
if "latency_us" in d:
    out.append("p99_us=%s" % d["latency_us"]["p99"])
if d.get("note"):
    out.append(d["note"])
print(" ".join(out))'
