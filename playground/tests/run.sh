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
BIN="$ROOT/target/debug/entitle"

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
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
TOML

"$BIN" --config "$CONFIG" migrate 2>/dev/null
ADMIN_KEY="$("$BIN" --config "$CONFIG" api-key create --name playground-test --role admin 2>/dev/null)"

"$BIN" --config "$CONFIG" serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
BASE="http://127.0.0.1:$PORT"
for _ in $(seq 1 100); do
  if node -e "fetch('$BASE/ready').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then cat "$WORK/server.log" >&2; echo "server did not start" >&2; exit 1; fi
  sleep 0.1
done

export BASE ADMIN_KEY DB
export SCREENSHOTS="$HERE/screenshots"
mkdir -p "$SCREENSHOTS"
node "$HERE/seed.mjs"
node "$HERE/browser.test.mjs"
