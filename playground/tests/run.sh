#!/usr/bin/env bash
# Browser tests of /playground: builds the server (debug), starts it on a
# fresh SQLite file and a free port, seeds customers through the public
# GraphQL API (store purchases, which have no API here, straight into SQL),
# then drives Debian's chromium with playwright-core. Never downloads a browser.
# Prints "N passed, N failed" last; exits non-zero on any failure.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"

apt_install() {
  echo "installing $*" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
command -v chromium >/dev/null || apt_install chromium
command -v sqlite3 >/dev/null || apt_install sqlite3
command -v node >/dev/null || apt_install nodejs npm
if [ ! -d "$HERE/node_modules/playwright-core" ]; then
  (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error)
fi

# Settings for the server under test come from its own file, not the caller's environment.
for v in $(compgen -e | grep -E '^(ENTITLE_|DATABASE_URL$)' | grep -v '^ENTITLE_TEST_' || true); do unset "$v"; done

cargo build --quiet --bin entitle
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/entitle"

WORK="$(mktemp -d)"
SERVER_PID=""
REPORTED=0
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  if [ "$REPORTED" = 0 ]; then
    [ -f "$WORK/server.log" ] && tail -n 20 "$WORK/server.log" >&2
    echo "0 passed, 1 failed"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

PORT="$(node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')"
DB="$WORK/entitle.db"
CONFIG="$WORK/entitle.toml"
cat >"$CONFIG" <<TOML
database_url = "sqlite://$DB?mode=rwc"
bind = "127.0.0.1:$PORT"
log = "warn"
# As in production: sandbox purchases are stored but grant nothing.
accept_sandbox = false

[auth.jwt]
algorithm = "HS256"
issuer = "https://playground.test/"
audience = "entitle"
admin_claim = "role"
admin_value = "admin"
leeway_secs = 30

[trial]
days = 7
entitlement = "pro"

[[catalog.entitlements]]
key = "pro"
description = "Pro features"

[[catalog.entitlements]]
key = "maps"
description = "Offline maps"

[[catalog.products]]
id = "pro_monthly"
display_name = "Pro, monthly"
kind = "subscription"
entitlements = ["pro"]
stripe_price_id = "price_pro_monthly"
app_store_product_id = "com.example.pro.monthly"
play_store_product_id = "pro_sub"

[[catalog.products]]
id = "maps_lifetime"
display_name = "Offline maps, for life"
kind = "lifetime"
entitlements = ["maps"]
app_store_product_id = "com.example.maps.lifetime"
play_store_product_id = "maps_lifetime"
stripe_payment_link = "plink_seed_maps"

[stripe]
webhook_secret = "whsec_playground_test_only"
TOML

# A throwaway signing secret, from the environment as in production.
ENTITLE_AUTH__JWT__SECRET="$(node -e 'console.log(require("crypto").randomBytes(32).toString("hex"))')"
export ENTITLE_AUTH__JWT__SECRET

"$BIN" --config "$CONFIG" migrate 2>/dev/null
ADMIN_KEY="$("$BIN" --config "$CONFIG" api-key create --name playground-test --role admin 2>/dev/null)"
ADMIN_TOKEN="$("$BIN" --config "$CONFIG" token --sub ops-person --admin)"
CUSTOMER_TOKEN="$("$BIN" --config "$CONFIG" token --sub alice)"

"$BIN" --config "$CONFIG" serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
BASE="http://127.0.0.1:$PORT"
for _ in $(seq 1 100); do
  if node -e "fetch('$BASE/ready').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then cat "$WORK/server.log" >&2; echo "server did not start" >&2; exit 1; fi
  sleep 0.1
done

# One "now" for the seed and the expectations, so a run across midnight agrees.
SEED_NOW="$(date +%s%3N)"
export BASE ADMIN_KEY ADMIN_TOKEN CUSTOMER_TOKEN DB SEED_NOW
export SCREENSHOTS="$HERE/screenshots"
mkdir -p "$SCREENSHOTS"
node "$HERE/seed.mjs"
status=0
REPORTED=1
node "$HERE/browser.test.mjs" || status=$?
exit "$status"
