#!/usr/bin/env bash
# Benchmark: release build, fresh SQLite file, 10,000 seeded customers, load
# from a second process (wrk), 64 connections x 10 s per scenario. Prints a
# table with ratios to GET /health from the same run and writes it to
# bench/results.md. BENCH_BIN runs another build (to compare two commits in
# one sitting) and BENCH_OUT writes its table elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

CONNS="${BENCH_CONNECTIONS:-64}"
DURATION="${BENCH_DURATION:-10s}"
CUSTOMERS="${BENCH_CUSTOMERS:-10000}"
PORT="${BENCH_PORT:-18088}"
POOL="${BENCH_POOL:-8}"
WEBHOOK_EVENTS="${BENCH_WEBHOOK_EVENTS:-30000}"
WEBHOOK_CUSTOMERS=1000
WEBHOOK_SECRET="whsec_bench_0123456789"
VECTORS="$PWD/../shared/vectors/stripe"
REDIS_URL="${BENCH_REDIS_URL:-redis://127.0.0.1:6379}"

missing=""
command -v wrk >/dev/null || missing="$missing wrk"
command -v sqlite3 >/dev/null || missing="$missing sqlite3"
if [ -n "$missing" ]; then
  echo "installing$missing"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

cargo build --release --quiet
BIN="${BENCH_BIN:-$PWD/target/release/entitle}"
WORK="$(mktemp -d)"
trap 'kill "${PID:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

cat > "$WORK/entitle.toml" <<TOML
database_url = "sqlite://$WORK/bench.db?mode=rwc"
bind = "127.0.0.1:$PORT"
log = "warn"
database_max_connections = $POOL
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
[[catalog.products]]
id = "pro_lifetime"
kind = "lifetime"
entitlements = ["pro"]
stripe_price_id = "price_lifetime"
[stripe]
payment_link = "https://buy.stripe.com/test_123"
# No secret key: webhooks are applied from their verified payload, without
# re-reading from the Stripe API, so the figure is Entitle's own cost.
webhook_secret = "$WEBHOOK_SECRET"

# Every request comes from one address and one client key: limits far above
# the load, so their checks are paid but never refuse.
[rate_limit]
per_key_per_minute = 100000000
per_key_burst = 100000000
per_ip_per_minute = 100000000
per_ip_burst = 100000000
TOML
# With Redis on this machine, every change is also published to a stream of
# the run's own (the relay's cost is then part of every write figure).
STREAM="bench:events:$$"
if redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1; then
  export ENTITLE_REDIS_URL="$REDIS_URL" ENTITLE_EVENTS__STREAM_KEY="$STREAM"
else
  REDIS_URL=""
fi

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

# Signed Stripe deliveries, replayed once each: every thread takes every
# second line, so no event is sent twice while the file lasts.
cat > "$WORK/webhook.lua" <<LUA
local lines = {}
local next_line
setup = function(thread)
  thread:set("tid", __tid or 0)
  __tid = (__tid or 0) + 1
end
init = function(args)
  local n = 0
  for line in io.lines("$WORK/events.txt") do
    if n % 2 == tid then
      local tab = line:find("\t", 1, true)
      lines[#lines + 1] = { line:sub(1, tab - 1), line:sub(tab + 1) }
    end
    n = n + 1
  end
  next_line = 1
end
request = function()
  local e = lines[next_line]
  next_line = next_line % #lines + 1
  return wrk.format("POST", "/webhooks/stripe", { ["content-type"] = "application/json", ["stripe-signature"] = e[1] }, e[2])
end
LUA
cat "$WORK/report.lua" >> "$WORK/webhook.lua"

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
python3 "$ROOT/bench/stripe_events.py" "$VECTORS" "$WORK/events.txt" "$WEBHOOK_EVENTS" "$WEBHOOK_CUSTOMERS" \
  "$WEBHOOK_SECRET" price_123 price_lifetime
W=$(run webhook webhook.lua /webhooks/stripe)
ROWS=$(sqlite3 "$WORK/bench.db" "SELECT COUNT(*) FROM webhook_events" 2>/dev/null || echo "?")

# Events: how long after the load the relay had published everything, and
# how long one change takes from the request to the stream.
EVENTS_LINE="Events: no Redis reachable at the configured URL; the relay was off."
if [ -n "$REDIS_URL" ]; then
  t0=$(date +%s%N)
  while [ "$(sqlite3 "$WORK/bench.db" "SELECT COUNT(*) FROM entitlement_events WHERE published_at IS NULL")" != 0 ]; do sleep 0.01; done
  DRAIN_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
  LOGGED=$(sqlite3 "$WORK/bench.db" "SELECT COUNT(*) FROM entitlement_events")
  XLEN=$(redis-cli -u "$REDIS_URL" XLEN "$STREAM")
  LAT=""
  for i in 1 2 3 4 5; do
    DEV="bench-latency-$$-$i"
    t0=$(date +%s%N)
    curl -s -o /dev/null -X POST -H "api-key: $CLIENT_KEY" -H 'content-type: application/json' \
      -d "{\"id\":\"$DEV\"}" "http://127.0.0.1:$PORT/user"
    until redis-cli -u "$REDIS_URL" XREVRANGE "$STREAM" + - COUNT 1 | grep -q "$DEV"; do :; done
    LAT="$LAT $(( ($(date +%s%N) - t0) / 1000 ))"
  done
  redis-cli -u "$REDIS_URL" DEL "$STREAM" >/dev/null
  EVENTS_LINE="Events: $LOGGED change-log rows, $XLEN entries on the stream; everything published ${DRAIN_MS} ms after the load stopped. Request to stream entry for a new device (POST /user, then XREVRANGE polling), five tries, microseconds:$LAT."
fi

cd - >/dev/null
python3 - "$READY_MS" "$EVENTS_LINE" "$CONNS" "$DURATION" "$CUSTOMERS" "$ROWS" "$WEBHOOK_EVENTS" "$POOL" "$H" "$G" "$U" "$W" <<'PY' | tee "${BENCH_OUT:-bench/results.md}"
import sys, platform, os, datetime
ready, events_line, conns, dur, customers, whrows, whevents, pool = sys.argv[1:9]
rows = [r.split() for r in sys.argv[9:]]
base = float(rows[0][1])
names = {"health": "GET /health", "graphql": "GraphQL `customer { entitlements }`", "user": "POST /user (known device)",
         "webhook": "signed Stripe webhooks, applied"}
budget = {"health": "", "graphql": ">= 0.25, p99 < 10 ms", "user": ">= 0.30", "webhook": ">= 2,000/s"}
print(f"# Benchmark results\n")
print(f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, {platform.machine()}, release build, SQLite, "
      f"{customers} customers, pool of {pool} connections, {conns} client connections x {dur} per scenario, "
      f"wrk -t2 on the same machine.\n")
print("| scenario | requests/s | p50 ms | p99 ms | errors | ratio to /health | budget | peak RSS MB |")
print("|---|---:|---:|---:|---:|---:|---|---:|")
for name, rps, p50, p99, errs, total, rss in rows:
    print(f"| {names[name]} | {float(rps):,.0f} | {p50} | {p99} | {errs} | {float(rps)/base:.2f} | {budget[name]} | {int(rss)/1024:.1f} |")
sent = int(rows[-1][5])
# wrk counts completed responses only; up to one request per connection was
# still in flight when it stopped, and the server finished those too.
extra = int(whrows) - min(sent, int(whevents)) if whrows.isdigit() else None
verdict = ("every delivered event recorded exactly once" if extra is not None and 0 <= extra <= int(conns)
           else "MISMATCH")
print(f"\nStripe webhooks: {sent:,} completed deliveries of distinct events ({whevents} prepared: "
      f"checkout.session.completed and customer.subscription.updated over 1,000 customers); "
      f"webhook_events rows afterwards: {whrows} ({verdict}; {extra} were in flight when the load stopped).")
print(f"\n{events_line}")
print(f"\nReady to serve after start on the populated database: {ready} ms (budget < 200 ms).")
PY
