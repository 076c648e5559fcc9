#!/usr/bin/env bash
# Runs keel-bench scenarios against Keel and its peers, in one run on one machine:
# each server pinned to core 0, the load generator to core 1 (taskset), servers
# started and stopped by PID. Results are appended as JSON lines to
# bench/results/<run>.jsonl and summarised as a Markdown table (bench/table.py).
#
#   bench/run.sh                                   # every server, default scenarios
#   SERVERS="keel bun" SCENARIOS="fanout:subs=1000,rate=100" bench/run.sh
#
# SCENARIOS is a space-separated list of NAME:key=value,key=value (keel-bench
# options without the dashes). SERVER_CORES=0,1 gives the server both cores (the
# load generator then shares them). Every run is bounded: each scenario has a
# duration or a count, and each server is stopped after its scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVERS=${SERVERS:-"keel bun node-ws socketio fastapi"}
SCENARIOS=${SCENARIOS:-"idle:conns=1000,hold=30s idle:conns=10000,hold=30s fanout:subs=1000,rate=100,duration=10s fanout:subs=10000,rate=100,duration=10s slow:subs=1000,rate=100,slow-fraction=0.1,duration=10s churn:rate=2000,total=20000"}
SERVER_CORES=${SERVER_CORES:-0}
# Keel's environment beyond its defaults: its per-connection message rate (100/s
# by default) would cap every load scenario. KEEL_ENV= runs it at its defaults
# (the abuse scenario does).
KEEL_ENV=${KEEL_ENV-KEEL_RATE_LIMIT_MESSAGES=0}
LOADGEN_CORES=${LOADGEN_CORES:-1}
PORT=${PORT:-9100}
RUN=${RUN:-$(date -u +%Y%m%dT%H%M%SZ)}
OUT=bench/results/$RUN.jsonl
mkdir -p bench/results

ulimit -n 20000 2>/dev/null || true
command -v taskset >/dev/null || { echo "taskset missing (util-linux)" >&2; exit 1; }

echo "== building keel and keel-bench (release)"
cargo build --release -q -p keel-server -p keel-bench

need_node=0; need_py=0
for s in $SERVERS; do
  case $s in bun|node-ws|socketio) need_node=1 ;; fastapi) need_py=1 ;; esac
done
if [ $need_node = 1 ] && [ ! -x bench/peers/node_modules/.bin/bun ]; then
  echo "== installing Node peers (npm)"
  (cd bench/peers && npm install --no-audit --no-fund --silent)
fi
if [ $need_py = 1 ] && [ ! -x bench/.venv/bin/uvicorn ]; then
  echo "== installing FastAPI peer (pip)"
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install -q -r bench/peers/fastapi/requirements.txt
fi

versions() {
  echo "keel $(./target/release/keel --version | cut -d' ' -f2)"
  [ $need_node = 1 ] && {
    echo "bun $(bench/peers/node_modules/.bin/bun --version)"
    echo "node $(node --version), ws $(node -p 'require("./bench/peers/node_modules/ws/package.json").version'), socket.io $(node -p 'require("./bench/peers/node_modules/socket.io/package.json").version')"
  }
  [ $need_py = 1 ] && echo "$(bench/.venv/bin/python -c 'import fastapi,uvicorn,websockets;print("fastapi",fastapi.__version__,"uvicorn",uvicorn.__version__,"websockets",websockets.__version__)')"
  return 0
}
versions | tee bench/results/$RUN.versions

start_server() { # name -> sets SERVER_PID and PROTOCOL
  local name=$1 log=bench/results/$RUN.$1.log
  case $name in
    keel)
      env $KEEL_ENV KEEL_API_KEY=bench KEEL_LOG_LEVEL=warn taskset -c "$SERVER_CORES" \
        ./target/release/keel serve --listen 127.0.0.1:$PORT >"$log" 2>&1 &
      PROTOCOL=keel ;;
    bun)
      PORT=$PORT taskset -c "$SERVER_CORES" bench/peers/node_modules/.bin/bun bench/peers/bun/server.ts >"$log" 2>&1 &
      PROTOCOL=trivial ;;
    node-ws)
      PORT=$PORT taskset -c "$SERVER_CORES" node bench/peers/node-ws/server.js >"$log" 2>&1 &
      PROTOCOL=trivial ;;
    socketio)
      PORT=$PORT taskset -c "$SERVER_CORES" node bench/peers/socketio/server.js >"$log" 2>&1 &
      PROTOCOL=socketio ;;
    fastapi)
      (cd bench/peers/fastapi && exec taskset -c "$SERVER_CORES" ../../.venv/bin/uvicorn app:app \
        --host 127.0.0.1 --port $PORT --log-level warning) >"$log" 2>&1 &
      PROTOCOL=trivial ;;
    *) echo "unknown server $name" >&2; exit 1 ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "$name died at start:"; cat "$log"; exit 1; }
    sleep 0.1
  done
  echo "$name did not open port $PORT" >&2; kill "$SERVER_PID"; exit 1
}

stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}

for server in $SERVERS; do
  for sc in $SCENARIOS; do
    name=${sc%%:*}; args=()
    if [ "$sc" != "$name" ]; then
      IFS=',' read -ra kvs <<< "${sc#*:}"
      for kv in "${kvs[@]}"; do args+=("--${kv%%=*}" "${kv#*=}"); done
    fi
    # A fresh server per scenario: one scenario's leftovers do not tax the next.
    start_server "$server"
    echo "== $server: $sc (pid $SERVER_PID)"
    if ! taskset -c "$LOADGEN_CORES" ./target/release/keel-bench "$name" --addr 127.0.0.1:$PORT \
        --protocol "$PROTOCOL" --pid "$SERVER_PID" --label "$server" --json "$OUT" "${args[@]}"; then
      echo "{\"label\":\"$server\",\"scenario\":\"$name\",\"error\":\"run failed\",\"args\":\"${sc}\"}" >> "$OUT"
    fi
    stop_server
  done
done

echo "== results: $OUT"
python3 bench/table.py "$OUT" | tee "bench/results/$RUN.md"
