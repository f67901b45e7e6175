#!/usr/bin/env python3
"""Turns the lines bench/run.sh collected into bench/results.md: one table
per backend, then the store webhooks' statements per event, read from the
server's own /metrics counters before and after each scenario."""
import datetime, os, platform, re, sys

results, profile, conns, dur, customers, webhook_customers, pg_at = sys.argv[1:8]
conns = int(conns)
secs = float(dur.rstrip("s"))

BACKENDS = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
NAMES = {"health": "GET /health", "graphql": "GraphQL `customer { entitlements }`",
         "user": "POST /user (known device)", "stripe": "signed Stripe webhooks",
         "apple": "signed App Store notifications", "google": "Google Play pushes (OIDC)"}
STORES = {"stripe": "stripe", "apple": "app_store", "google": "play_store"}
STORE_NAMES = {"stripe": "Stripe", "apple": "App Store", "google": "Google Play"}
RSS_BUDGET_MB = 64


def budget(backend, name, rps, ratio, p99):
    """The issue's budget for a row, and whether this run met it."""
    if name == "graphql":
        return ">= 0.25, p99 < 10 ms", (ratio >= 0.25, p99 < 10)
    if name == "user":
        return ">= 0.30", ratio >= 0.30
    if name == "stripe":
        floor = 2500 if backend == "sqlite" else 1500
        return f">= {floor:,}/s", rps >= floor
    return "", None


def metrics(path):
    out = {}
    for line in open(path):
        m = re.match(r"^(entitle_\w+)(\{[^}]*\})? (\S+)$", line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def delta(before, after, name):
    return after.get(name, 0.0) - before.get(name, 0.0)


def outcomes(before, after, store):
    """Acknowledged notifications of one store by outcome, over the scenario."""
    out = {}
    pat = re.compile(r'^entitle_webhook_events_total\{store="%s",outcome="(\w+)"\}$' % store)
    for k in after:
        m = pat.match(k)
        if m and delta(before, after, k) > 0:
            out[m.group(1)] = int(delta(before, after, k))
    return out


rows, stores, ready, idle, events, logs, skips, versions = {}, {}, {}, {}, {}, {}, [], {}
load = "?"
for line in open(results):
    kind, *f = line.split()
    if kind == "ROW":
        b, name, rps, p50, p99, errs, total, wraps, rss = f
        rows.setdefault(b, []).append(dict(name=name, rps=float(rps), p50=float(p50), p99=float(p99),
                                           errs=int(errs), total=int(total), wraps=int(wraps), rss=int(rss)))
    elif kind == "STORE":
        b, store, prepared, nrows, drained, before, after = f
        stores.setdefault(b, {})[store] = dict(prepared=int(prepared), rows=int(nrows), drained=int(drained),
                                               before=metrics(before), after=metrics(after))
    elif kind == "READY":
        ready[f[0]] = (int(f[1]), int(f[2]))
    elif kind == "IDLE":
        idle[f[0]] = delta(metrics(f[1]), metrics(f[2]), "entitle_db_statements_total") / secs
    elif kind == "EVENTS":
        events[f[0]] = (int(f[1]), int(f[2]), f[3:])
    elif kind == "LOG":
        logs.setdefault(f[0], []).append((int(f[1]), line.split(None, 3)[3].strip()))
    elif kind == "VERSION":
        versions[f[0]] = f[1]
    elif kind == "LOAD":
        load = " ".join(f)
    elif kind == "SKIP":
        skips.append(line.split(None, 2)[2].strip())

build = "release build" if profile == "release" else f"{profile} build (figures not comparable)"
print("# Benchmark results\n")
where = []
for b in rows:
    pool = ready[b][1]
    if b == "sqlite":
        where.append(f"SQLite (a fresh file, pool of {pool})")
    else:
        host = "on this machine" if pg_at == "local" else "on another host"
        where.append(f"PostgreSQL {versions.get(b, '')} (a fresh database, {host}, pool of {pool})")
print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
      f"{platform.machine()}, {build}, {customers} customers, {conns} client connections x {dur} per "
      f"scenario, wrk -t2 on the same machine; {' and '.join(where) or 'no backend ran'}. Each backend has its own "
      f"server process and its own GET /health figure. Load average (1, 5, 15 min) as the run began: {load}.\n")
for s in skips:
    print(f"{s}\n")
if not rows:
    sys.exit(0)

for b, rs in rows.items():
    base = next(r["rps"] for r in rs if r["name"] == "health")
    print(f"## {BACKENDS[b]}\n")
    print("| scenario | requests/s | p50 ms | p99 ms | errors | ratio to /health | budget | met | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---|---|---:|")
    for r in rs:
        ratio = r["rps"] / base
        text, ok = budget(b, r["name"], r["rps"], ratio, r["p99"])
        if isinstance(ok, tuple):
            met = "yes" if all(ok) else f"ratio {'yes' if ok[0] else '**no**'}, p99 {'yes' if ok[1] else '**no**'}"
        else:
            met = "" if ok is None else ("yes" if ok else "**no**")
        print(f"| {NAMES[r['name']]} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['errs']} | "
              f"{ratio:.2f} | {text} | {met} | {r['rss'] / 1024:.1f} |")
    peak = max(r["rss"] for r in rs) / 1024
    print(f"\nPeak RSS through the run: {peak:.2f} MB (budget < {RSS_BUDGET_MB} MB: "
          f"{'met' if peak < RSS_BUDGET_MB else 'not met'}). Ready to serve after start on the populated "
          f"database: {ready[b][0]} ms (budget < 200 ms).\n")

print("## Store notifications: statements per event\n")
print("Read from the server's `entitle_db_statements_total`, `entitle_db_write_transactions_total` and "
      "`entitle_webhook_events_total` before and after each scenario (after the event relay had "
      "published everything, so its statements count too); BEGIN and COMMIT are not statements. On SQLite, "
      "writers queued behind one another share one commit (each answered only after it), so commits per "
      "event fall below one under load.\n")
print("| store | backend | events applied | other outcomes | statements / event | commits / event "
      "| completed deliveries | webhook_events rows | check |")
print("|---|---|---:|---|---:|---:|---:|---:|---|")
notes = []
for b, ss in stores.items():
    by_name = {r["name"]: r for r in rows[b]}
    for store, s in ss.items():
        before, after = s["before"], s["after"]
        outs = outcomes(before, after, STORES[store])
        applied = outs.pop("applied", 0)
        other = ", ".join(f"{k} {v}" for k, v in sorted(outs.items())) or "none"
        st = delta(before, after, "entitle_db_statements_total")
        tx = delta(before, after, "entitle_db_write_transactions_total")
        per = (lambda x: f"{x / applied:.1f}") if applied else (lambda x: "n/a")
        # Batched commits are a small fraction of an event each.
        per2 = (lambda x: f"{x / applied:.2f}") if applied else (lambda x: "n/a")
        r = by_name[store]
        # wrk counts completed responses only; up to one request per
        # connection was still in flight when it stopped, and the server
        # finished those too.
        extra = s["rows"] - r["total"]
        if r["wraps"]:
            check = f"**file ran out** ({s['prepared']:,} prepared; later deliveries were duplicates)"
        elif 0 <= extra <= conns and not outs and r["errs"] == 0:
            check = f"each recorded once ({extra} in flight at the stop)"
        else:
            check = "**MISMATCH**"
        print(f"| {STORE_NAMES[store]} | {BACKENDS[b]} | {applied:,} | {other} | {per(st)} | {per2(tx)} | "
              f"{r['total']:,} | {s['rows']:,} | {check} |")
    if b in idle:
        notes.append(f"{BACKENDS[b]}: the background jobs ran {idle[b]:.1f} statements/s while only GET /health "
                     f"was served; that rate is included above, and is small beside the events'.")

print(f"""
Each file holds distinct events over {int(webhook_customers):,} customers, alternately a new one-time
purchase of the lifetime product and a renewal of the customer's subscription:
- Stripe: `checkout.session.completed` (one-time payment) and `customer.subscription.updated`, built
  from Stripe's own fixtures and signed with the webhook secret; no Stripe API key is configured, so
  each is applied from its verified payload.
- App Store: App Store Server Notifications v2, `ONE_TIME_CHARGE` and `DID_RENEW`, each a JWS with
  its signed transaction (and renewal info) inside, all signed with Apple's test certificate chain,
  whose root the server is configured to trust in place of Apple's. No App Store Server API key is
  configured, so each is applied from its verified payload without calling out.
- Google Play: Pub/Sub pushes of `ONE_TIME_PRODUCT_PURCHASED` and `SUBSCRIPTION_RENEWED`, each with
  an OIDC bearer token signed by a local key whose JWKS the server fetches from a local endpoint (one
  token for the whole file, as Pub/Sub reuses a token while it is valid). A notification carries only
  a purchase token, so the server reads the purchase back: a local fake of the Play Developer API
  (token exchange and `purchases.subscriptionsv2.get` / `purchases.products.get`, in Google's shapes,
  purchases already acknowledged) answers it on the same machine, one thread, and its CPU counts
  against the server's.""")
for n in notes:
    print(f"\n{n}")

for b, (logged, xlen, lat) in events.items():
    drained = ", ".join(f"{STORE_NAMES[k]} {v['drained']} ms" for k, v in stores.get(b, {}).items())
    print(f"\nEvents ({BACKENDS[b]}): {logged} change-log rows, {xlen} entries on the run's stream; the relay had "
          f"published everything this long after each webhook load stopped: {drained}. Request to stream entry "
          f"for a new device (POST /user, then XREVRANGE polling), five tries, microseconds: {' '.join(lat)}.")
if rows and not events:
    print("\nEvents: no Redis reachable at the configured URL; the relay was off.")
for b, lines in logs.items():
    print(f"\nThe server's log ({BACKENDS[b]}), most frequent warnings and errors:\n")
    for n, text in lines:
        print(f"- {n} x `{text}`")
