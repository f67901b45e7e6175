#!/usr/bin/env bash
# Benchmark: release build, fresh SQLite file, 10,000 seeded customers, load
# from a second process (wrk), 64 connections x 10 s per scenario. Prints a
# table with ratios to GET /health from the same run and writes it to
# bench/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS="${BENCH_CONNECTIONS:-64}"
DURATION="${BENCH_DURATION:-10s}"
CUSTOMERS="${BENCH_CUSTOMERS:-10000}"
PORT="${BENCH_PORT:-18088}"

if ! command -v wrk >/dev/null; then
  echo "installing wrk"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk >/dev/null
fi

cargo build --release --quiet
BIN="$PWD/target/release/entitle"
WORK="$(mktemp -d)"
trap 'kill "${PID:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

cat > "$WORK/entitle.toml" <<TOML
database_url = "sqlite://$WORK/bench.db?mode=rwc"
bind = "127.0.0.1:$PORT"
log = "warn"
database_max_connections = 16
[trial]
days = 7
entitlement = "pro"
[[catalog.entitlements]]
key = "pro"
[[catalog.products]]
id = "pro_monthly"
kind = "subscription"
entitlements = ["pro"]
stripe_price_id = "price_123"
[stripe]
payment_link = "https://buy.stripe.com/test_123"
TOML

cd "$WORK"
"$BIN" migrate 2>/dev/null
CLIENT_KEY="$("$BIN" api-key create --name bench-client --role client 2>/dev/null)"
SERVICE_KEY="$("$BIN" api-key create --name bench-service --role service 2>/dev/null)"

# Sets PID and READY_MS (start to first healthy answer). The server's output
# goes to a file: an inherited stdout would keep callers waiting.
start_server() {
  local t0 t1
  t0=$(date +%s%N)
  "$BIN" serve >>"$WORK/server.log" 2>&1 &
  PID=$!
  until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do sleep 0.005; done
  t1=$(date +%s%N)
  READY_MS=$(( (t1 - t0) / 1000000 ))
}

start_server
echo "seeding $CUSTOMERS customers"
python3 - "$PORT" "$CLIENT_KEY" "$CUSTOMERS" <<'PY'
import http.client, json, sys, threading
port, key, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def work(lo, hi):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for i in range(lo, hi):
        c.request("POST", "/user", json.dumps({"id": f"dev-{i}"}), {"api-key": key, "content-type": "application/json"})
        r = c.getresponse(); r.read()
        assert r.status == 200, r.status
ts = [threading.Thread(target=work, args=(k * n // 8, (k + 1) * n // 8)) for k in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
PY

# Restart on the now-populated database: time to ready, and a clean RSS peak.
kill "$PID"; wait "$PID" 2>/dev/null || true
start_server

cat > "$WORK/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local secs = summary.duration / 1e6
  io.write(string.format("RESULT %.0f %.2f %.2f %d %d\n", summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests))
end
LUA
cat > "$WORK/graphql.lua" <<LUA
math.randomseed(42)
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["api-key"] = "$SERVICE_KEY"
request = function()
  local body = string.format('{"query":"query(\$id: ID!){customer(id: \$id){entitlements{key isActive expiresAt}}}","variables":{"id":"dev-%d"}}', math.random(0, $CUSTOMERS - 1))
  return wrk.format(nil, "/graphql", nil, body)
end
LUA
cat "$WORK/report.lua" >> "$WORK/graphql.lua"
cat > "$WORK/user.lua" <<LUA
math.randomseed(7)
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["api-key"] = "$CLIENT_KEY"
request = function()
  return wrk.format(nil, "/user", nil, string.format('{"id":"dev-%d"}', math.random(0, $CUSTOMERS - 1)))
end
LUA
cat "$WORK/report.lua" >> "$WORK/user.lua"
cp "$WORK/report.lua" "$WORK/health.lua"

run() { # name script path
  local line
  line=$(wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$WORK/$2" "http://127.0.0.1:$PORT$3" | grep '^RESULT')
  local rss
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
  echo "$1 ${line#RESULT } $rss"
}

echo "running scenarios ($CONNS connections, $DURATION each)"
H=$(run health health.lua /health)
G=$(run graphql graphql.lua /graphql)
U=$(run user user.lua /user)

cd - >/dev/null
python3 - "$READY_MS" "$CONNS" "$DURATION" "$CUSTOMERS" "$H" "$G" "$U" <<'PY' | tee bench/results.md
import sys, platform, os, datetime
ready, conns, dur, customers = sys.argv[1:5]
rows = [r.split() for r in sys.argv[5:]]
base = float(rows[0][1])
names = {"health": "GET /health", "graphql": "GraphQL `customer { entitlements }`", "user": "POST /user (known device)"}
budget = {"health": "", "graphql": ">= 0.25, p99 < 10 ms", "user": ">= 0.30"}
print(f"# Benchmark results\n")
print(f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, {platform.machine()}, release build, SQLite, "
      f"{customers} customers, {conns} connections x {dur} per scenario, wrk -t2 on the same machine.\n")
print("| scenario | requests/s | p50 ms | p99 ms | errors | ratio to /health | budget | peak RSS MB |")
print("|---|---:|---:|---:|---:|---:|---|---:|")
for name, rps, p50, p99, errs, total, rss in rows:
    print(f"| {names[name]} | {float(rps):,.0f} | {p50} | {p99} | {errs} | {float(rps)/base:.2f} | {budget[name]} | {int(rss)/1024:.1f} |")
print(f"\nReady to serve after start on the populated database: {ready} ms (budget < 200 ms).")
PY
