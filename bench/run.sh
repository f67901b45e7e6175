#!/usr/bin/env bash
# Benchmark: release build, 10,000 seeded customers, load from a second
# process (wrk), 64 connections x 10 s per scenario, run once on a fresh
# SQLite file and once on a fresh PostgreSQL database. Each run takes its own
# GET /health figure, so the ratios compare like with like. Prints the tables
# and writes them to bench/results.md.
#
# BENCH_BIN runs another build (to compare two commits in one sitting),
# BENCH_OUT writes the tables elsewhere, BENCH_BACKENDS picks the backends
# ("sqlite postgres"), BENCH_POSTGRES_URL names a PostgreSQL server and a
# database on it to connect to while creating the run's own (dropped
# afterwards), BENCH_PROFILE=dev checks the scenarios with the development
# build (its figures are not comparable).
set -euo pipefail
# Paths given by the caller are relative to where it stands.
[ -z "${BENCH_BIN:-}" ] || BENCH_BIN="$(realpath "$BENCH_BIN")"
[ -z "${BENCH_OUT:-}" ] || BENCH_OUT="$(realpath -m "$BENCH_OUT")"
cd "$(dirname "$0")/.."
ROOT="$PWD"

CONNS="${BENCH_CONNECTIONS:-64}"
DURATION="${BENCH_DURATION:-10s}"
CUSTOMERS="${BENCH_CUSTOMERS:-10000}"
PORT="${BENCH_PORT:-18088}"
FAKE_PORT="$((PORT + 1))"
# The server's own default on SQLite: two readers per core, 4 to 8.
POOL_SQLITE="${BENCH_POOL:-$(n=$(( $(nproc) * 2 )); [ "$n" -lt 4 ] && n=4; [ "$n" -gt 8 ] && n=8; echo "$n")}"
POOL_POSTGRES="${BENCH_POSTGRES_POOL:-16}"
BACKENDS="${BENCH_BACKENDS:-sqlite postgres}"
POSTGRES_URL="${BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
PROFILE="${BENCH_PROFILE:-release}"
# Enough that 10 s of Stripe deliveries at 6,000/s send each event once.
STRIPE_EVENTS="${BENCH_WEBHOOK_EVENTS:-60000}"
# The report says when a load ran out of events (it then sent duplicates).
APPLE_EVENTS="${BENCH_APPLE_EVENTS:-30000}"
GOOGLE_EVENTS="${BENCH_GOOGLE_EVENTS:-30000}"
WEBHOOK_CUSTOMERS=1000
WEBHOOK_SECRET="whsec_bench_0123456789"
VECTORS="$ROOT/../shared/vectors"
# Google's push-token key and the service account's, all in one local key.
PLAY_KEY="$ROOT/tests/fixtures/jwt_rs256_private.pem"
APPLE_LEAF_KEY="$ROOT/tests/fixtures/apple/testLeaf.pk8.pem"
REDIS_URL="${BENCH_REDIS_URL:-redis://127.0.0.1:6379}"
# Encrypts the token-signing keys at rest.
ENCRYPTION_KEY="YmVuY2gtb25seS1lbmNyeXB0aW9uLWtleS0zMi1ieXQ="
THREADS=2

missing=""
command -v wrk >/dev/null || missing="$missing wrk"
command -v sqlite3 >/dev/null || missing="$missing sqlite3"
case " $BACKENDS " in *" postgres "*) command -v psql >/dev/null || missing="$missing postgresql-client" ;; esac
if [ -n "$missing" ]; then
  echo "installing$missing"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

# One build for both: the event generator is a workspace member with the
# server's dependencies, so it compiles in seconds on top of the server.
cargo build --profile "$PROFILE" --quiet -p entitle -p bench-events
OUTDIR="${CARGO_TARGET_DIR:-$ROOT/target}/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
BIN="${BENCH_BIN:-$OUTDIR/entitle}"
GEN="$OUTDIR/bench-events"
WORK="$(mktemp -d)"
RESULTS="$WORK/results.txt"
# Other work on the machine moves every figure; the report shows how much there was.
echo "LOAD $(cut -d' ' -f1-3 /proc/loadavg)" > "$RESULTS"
PG_DB=""
cleanup() {
  # Never `kill 0`: that would be this script's whole process group.
  local p
  for p in ${PID:-} ${FAKE_PID:-}; do kill "$p" 2>/dev/null || true; done
  if [ -n "$PG_DB" ]; then
    psql "$POSTGRES_URL" -qc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

cat > "$WORK/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local secs = summary.duration / 1e6
  local wraps = 0
  for _, t in ipairs(threads or {}) do wraps = wraps + (t:get("wraps") or 0) end
  io.write(string.format("RESULT %.0f %.2f %.2f %d %d %d\n", summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests, wraps))
end
LUA
cp "$WORK/report.lua" "$WORK/health.lua"

# Signed deliveries, `<header value>\t<body>` a line, replayed once each:
# thread k sends lines k, k + THREADS, ..., read as it goes (an App Store
# file runs to hundreds of MB). Past the end of the file it starts again and
# counts a wrap, which the report flags (those are duplicates).
replay_script() { # file route header
  cat > "$WORK/replay-$(basename "$1").lua" <<LUA
threads = {}
setup = function(thread)
  thread:set("tid", #threads)
  threads[#threads + 1] = thread
end
local f, n
init = function(args)
  f = io.open("$1")
  n = 0
  wraps = 0
end
local function next_line()
  while true do
    local line = f:read("*l")
    if line == nil then
      f:close()
      f = io.open("$1")
      wraps = wraps + 1
    else
      n = n + 1
      if (n - 1) % $THREADS == tid then return line end
    end
  end
end
request = function()
  local line = next_line()
  local tab = line:find("\t", 1, true)
  local headers = { ["content-type"] = "application/json" }
  if tab > 1 then headers["$3"] = line:sub(1, tab - 1) end
  return wrk.format("POST", "$2", headers, line:sub(tab + 1))
end
LUA
  cat "$WORK/report.lua" >> "$WORK/replay-$(basename "$1").lua"
  echo "replay-$(basename "$1").lua"
}

run() { # name script path
  local line rss
  line=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$WORK/$2" "http://127.0.0.1:$PORT$3" | grep '^RESULT')
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
  echo "ROW $BACKEND $1 ${line#RESULT } $rss" >> "$RESULTS"
}

sql() {
  if [ "$BACKEND" = sqlite ]; then sqlite3 "$DIR/bench.db" "$1"; else psql "$DB_URL" -Atqc "$1"; fi
}

snapshot() { # file
  curl -sf "http://127.0.0.1:$PORT/metrics" > "$1"
}

# Sets PID and READY_MS (start to first healthy answer). The server's output
# goes to a file: an inherited stdout would keep callers waiting.
start_server() {
  local t0 t1
  t0=$(date +%s%N)
  "$BIN" serve >>"$DIR/server.log" 2>&1 &
  PID=$!
  until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do sleep 0.005; done
  t1=$(date +%s%N)
  READY_MS=$(( (t1 - t0) / 1000000 ))
}

# Waits for the relay to have published every change-log row; prints how long that took.
drain() {
  local t0
  t0=$(date +%s%N)
  if [ -n "$REDIS_ON" ]; then
    while [ "$(sql "SELECT COUNT(*) FROM entitlement_events WHERE published_at IS NULL")" != 0 ]; do sleep 0.01; done
  fi
  echo $(( ($(date +%s%N) - t0) / 1000000 ))
}

webhook_scenario() { # store route header file prepared
  local script before="$DIR/metrics-$1-before" after="$DIR/metrics-$1-after" drained rows
  script=$(replay_script "$4" "$2" "$3")
  snapshot "$before"
  run "$1" "$script" "$2"
  drained=$(drain)
  snapshot "$after"
  rows=$(sql "SELECT COUNT(*) FROM webhook_events WHERE source = '$(store_source "$1")'")
  echo "STORE $BACKEND $1 $5 $rows $drained $before $after" >> "$RESULTS"
}

store_source() {
  case "$1" in stripe) echo stripe ;; apple) echo app_store ;; google) echo play_store ;; esac
}

redacted() { # a URL without its password
  python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(p.hostname or "", p.port or 5432, sep=":")' "$1"
}

where() { # the report names no host: whether the database shares the machine is what matters
  case "$(redacted "$1")" in 127.0.0.1:* | localhost:* | ::1:* | :*) echo local ;; *) echo remote ;; esac
}

# The App Store and Play files serve both backends (each has its own
# database, so every event is new to it); Stripe's are signed per run, since
# a Stripe signature is only good for 300 s.
echo "preparing App Store and Google Play notifications"
"$GEN" apple "$VECTORS/apple/certs" "$APPLE_LEAF_KEY" "$WORK/apple.txt" "$APPLE_EVENTS" "$WEBHOOK_CUSTOMERS"
"$GEN" google "$PLAY_KEY" "$WORK/google.txt" "$GOOGLE_EVENTS" "$WEBHOOK_CUSTOMERS"
"$GEN" play-fake "$PLAY_KEY" "$FAKE_PORT" >"$WORK/play-fake.log" 2>&1 &
FAKE_PID=$!
until curl -sf "http://127.0.0.1:$FAKE_PORT/jwks" >/dev/null 2>&1; do sleep 0.01; done
"$GEN" config "$VECTORS/apple/certs" "$PLAY_KEY" "http://127.0.0.1:$FAKE_PORT" > "$WORK/stores.toml"

cat > "$WORK/graphql.lua.in" <<'LUA'
math.randomseed(42)
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["api-key"] = "@KEY@"
request = function()
  local body = string.format('{"query":"query($id: ID!){customer(id: $id){entitlements{key isActive expiresAt}}}","variables":{"id":"dev-%d"}}', math.random(0, @CUSTOMERS@ - 1))
  return wrk.format(nil, "/graphql", nil, body)
end
LUA
cat > "$WORK/user.lua.in" <<'LUA'
math.randomseed(7)
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["api-key"] = "@KEY@"
request = function()
  return wrk.format(nil, "/user", nil, string.format('{"id":"dev-%d"}', math.random(0, @CUSTOMERS@ - 1)))
end
LUA

run_backend() {
  BACKEND="$1"
  DIR="$WORK/$BACKEND"
  mkdir -p "$DIR"
  local pool
  if [ "$BACKEND" = sqlite ]; then
    DB_URL="sqlite://$DIR/bench.db?mode=rwc"
    pool="$POOL_SQLITE"
  else
    if ! psql "$POSTGRES_URL" -Atqc "SELECT 1" >/dev/null 2>&1; then
      echo "SKIP postgres PostgreSQL: nothing reachable at BENCH_POSTGRES_URL; the PostgreSQL variant was not run." >> "$RESULTS"
      echo "PostgreSQL not reachable at $(redacted "$POSTGRES_URL"): skipped"
      return
    fi
    PG_DB="entitle_bench_$$"
    psql "$POSTGRES_URL" -qc "CREATE DATABASE $PG_DB" >/dev/null
    DB_URL=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$POSTGRES_URL" "$PG_DB")
    pool="$POOL_POSTGRES"
  fi
  echo "== $BACKEND (pool of $pool connections)"
  cat > "$DIR/entitle.toml" <<TOML
database_url = "$DB_URL"
bind = "127.0.0.1:$PORT"
log = "warn"
database_max_connections = $pool
[trial]
days = 7
entitlement = "pro"
[[catalog.entitlements]]
key = "pro"
# The store product ids are the ones bench-events signs.
[[catalog.products]]
id = "pro_monthly"
kind = "subscription"
entitlements = ["pro"]
stripe_price_id = "price_123"
app_store_product_id = "com.example.pro.monthly"
play_store_product_id = "pro_sub:monthly"
[[catalog.products]]
id = "pro_lifetime"
kind = "lifetime"
entitlements = ["pro"]
stripe_price_id = "price_lifetime"
app_store_product_id = "com.example.pro.lifetime"
play_store_product_id = "pro_lifetime"
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

# Required on PostgreSQL; on SQLite it spares the warning about the key file.
[tokens]
encryption_key = "$ENCRYPTION_KEY"
TOML
  cat "$WORK/stores.toml" >> "$DIR/entitle.toml"

  # With Redis on this machine, every change is also published to a stream of
  # the run's own (the relay's cost is then part of every write figure).
  local stream="bench:events:$$:$BACKEND"
  REDIS_ON=""
  if redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1; then
    export ENTITLE_REDIS_URL="$REDIS_URL" ENTITLE_EVENTS__STREAM_KEY="$stream"
    REDIS_ON=1
  fi

  cd "$DIR"
  "$BIN" migrate 2>/dev/null
  local client_key service_key
  client_key="$("$BIN" api-key create --name bench-client --role client 2>/dev/null)"
  service_key="$("$BIN" api-key create --name bench-service --role service 2>/dev/null)"

  start_server
  echo "seeding $CUSTOMERS customers"
  python3 - "$PORT" "$client_key" "$CUSTOMERS" <<'PY'
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
  echo "READY $BACKEND $READY_MS $pool" >> "$RESULTS"
  [ "$BACKEND" = sqlite ] || echo "VERSION $BACKEND $(sql 'SHOW server_version')" >> "$RESULTS"

  sed -e "s/@KEY@/$service_key/" -e "s/@CUSTOMERS@/$CUSTOMERS/" "$WORK/graphql.lua.in" > "$DIR/graphql.lua"
  sed -e "s/@KEY@/$client_key/" -e "s/@CUSTOMERS@/$CUSTOMERS/" "$WORK/user.lua.in" > "$DIR/user.lua"
  cat "$WORK/report.lua" >> "$DIR/graphql.lua"
  cat "$WORK/report.lua" >> "$DIR/user.lua"

  echo "running scenarios ($CONNS connections, $DURATION each)"
  # Nothing on /health touches the database: the statements counted over it
  # are the background jobs' own.
  snapshot "$DIR/metrics-health-before"
  run health health.lua /health
  snapshot "$DIR/metrics-health-after"
  echo "IDLE $BACKEND $DIR/metrics-health-before $DIR/metrics-health-after" >> "$RESULTS"
  run graphql "$BACKEND/graphql.lua" /graphql
  run user "$BACKEND/user.lua" /user
  python3 "$ROOT/bench/stripe_events.py" "$VECTORS/stripe" "$DIR/stripe.txt" "$STRIPE_EVENTS" "$WEBHOOK_CUSTOMERS" \
    "$WEBHOOK_SECRET" price_123 price_lifetime
  webhook_scenario stripe /webhooks/stripe stripe-signature "$DIR/stripe.txt" "$STRIPE_EVENTS"
  webhook_scenario apple /webhooks/apple authorization "$WORK/apple.txt" "$APPLE_EVENTS"
  webhook_scenario google /webhooks/google authorization "$WORK/google.txt" "$GOOGLE_EVENTS"

  # Events: how long one change takes from the request to the stream.
  if [ -n "$REDIS_ON" ]; then
    local logged xlen lat="" dev t0 i
    logged=$(sql "SELECT COUNT(*) FROM entitlement_events")
    xlen=$(redis-cli -u "$REDIS_URL" XLEN "$stream")
    for i in 1 2 3 4 5; do
      dev="bench-latency-$$-$BACKEND-$i"
      t0=$(date +%s%N)
      curl -s -o /dev/null -X POST -H "api-key: $client_key" -H 'content-type: application/json' \
        -d "{\"id\":\"$dev\"}" "http://127.0.0.1:$PORT/user"
      until redis-cli -u "$REDIS_URL" XREVRANGE "$stream" + - COUNT 1 | grep -q "$dev"; do :; done
      lat="$lat $(( ($(date +%s%N) - t0) / 1000 ))"
    done
    redis-cli -u "$REDIS_URL" DEL "$stream" >/dev/null
    echo "EVENTS $BACKEND $logged $xlen$lat" >> "$RESULTS"
  fi
  # The server logs at warn: every line is a warning or an error. The most
  # frequent ones go to the report, without colours and timestamps.
  sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^[^ ]* *//' "$DIR/server.log" | sort | uniq -c | sort -rn | head -5 |
    sed "s/^ */LOG $BACKEND /" >> "$RESULTS" || true

  kill "$PID"; wait "$PID" 2>/dev/null || true
  PID=""
  cd "$ROOT"
  if [ "$BACKEND" = postgres ]; then
    psql "$POSTGRES_URL" -qc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null
    PG_DB=""
  fi
}

for b in $BACKENDS; do run_backend "$b"; done

python3 "$ROOT/bench/report.py" "$RESULTS" "$PROFILE" "$CONNS" "$DURATION" "$CUSTOMERS" "$WEBHOOK_CUSTOMERS" \
  "$(where "$POSTGRES_URL")" | tee "${BENCH_OUT:-$ROOT/bench/results.md}"
