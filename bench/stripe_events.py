#!/usr/bin/env python3
"""Writes signed Stripe webhook deliveries for the benchmark, one per line as
`<Stripe-Signature>\t<body>`: alternately checkout.session.completed (one-time
payment for a lifetime product) and customer.subscription.updated, spread over
`customers` customers, every event id distinct. Objects start from Stripe's own
fixtures so they parse as strictly as real ones. Signatures use the current
time: run the load within 300 s."""
import hashlib, hmac, json, sys, time
from pathlib import Path

vectors, out, count, customers, secret, price_sub, price_life = sys.argv[1:8]
count, customers = int(count), int(customers)
vectors = Path(vectors)
envelope = json.loads((vectors / "event.checkout.session.completed.json").read_text())
session = json.loads((vectors / "object.checkout.session.json").read_text())
subscription = json.loads((vectors / "object.subscription.json").read_text())

now = int(time.time())
with open(out, "w") as f:
    for n in range(count):
        c = n % customers
        if n % 2 == 0:
            obj = dict(session, id=f"cs_bench_{n}", mode="payment", client_reference_id=f"dev-{c}",
                       customer=None, subscription=None, status="complete", payment_status="paid",
                       payment_intent=f"pi_bench_{n}", metadata={"product_id": "pro_lifetime"})
            kind = "checkout.session.completed"
        else:
            obj = json.loads(json.dumps(subscription))
            obj.update(id=f"sub_bench_{c}", customer=f"cus_bench_{c}", status="active", cancel_at=None,
                       canceled_at=None, ended_at=None, cancel_at_period_end=False, trial_end=None,
                       trial_start=None, start_date=now - 86400, created=now - 86400,
                       latest_invoice=f"in_bench_{c}", metadata={"customer_id": f"dev-{c}"})
            item = obj["items"]["data"][0]
            item["price"]["id"] = price_sub
            item["subscription"] = obj["id"]
            item["current_period_start"] = now - 86400
            item["current_period_end"] = now + 29 * 86400
            kind = "customer.subscription.updated"
        event = dict(envelope, id=f"evt_bench_{n}", type=kind, created=now, data={"object": obj})
        body = json.dumps(event, separators=(",", ":"))
        sig = hmac.new(secret.encode(), f"{now}.{body}".encode(), hashlib.sha256).hexdigest()
        f.write(f"t={now},v1={sig}\t{body}\n")
