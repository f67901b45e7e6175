// Seeds the server under test. Customers, devices, trials and promotional
// grants go through the public GraphQL API; store purchases, receipts and
// their change-log rows, which only the store integrations write, go straight
// into the SQLite file, and so do back-dated trials (the API always starts
// them "now").
import { execFileSync } from 'node:child_process';

const { BASE, ADMIN_KEY, DB } = process.env;
const DAY = 86400e3;
const now = Number(process.env.SEED_NOW) || Date.now();

async function gql(query, variables) {
  const r = await fetch(BASE + '/graphql', {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'api-key': ADMIN_KEY },
    body: JSON.stringify({ query, variables }),
  });
  const body = await r.json();
  if (!r.ok || body.errors) throw new Error(`seed: ${JSON.stringify(body)}`);
  return body.data;
}

const register = (platform, deviceId, customerId) => gql(
  'mutation Seed($input: RegisterDeviceInput!) { registerDevice(input: $input) { created } }',
  { input: { platform, deviceId, customerId } });

// The text form the server itself writes for timestamps in SQLite.
const ts = (offsetDays) => {
  const d = new Date(Math.floor((now + offsetDays * DAY) / 1000) * 1000);
  return `'${d.toISOString().replace(/\.\d{3}Z$/, '+00:00')}'`;
};
const q = (s) => (s === null ? 'NULL' : `'${String(s).replace(/'/g, "''")}'`);

function sql(statements) {
  execFileSync('sqlite3', [DB], { input: '.timeout 10000\n' + statements.join(';\n') + ';\n', stdio: ['pipe', 'inherit', 'inherit'] });
}

// Moves a customer's server-side trial (and first sight) into the past.
function backdateTrial(customer, startDays) {
  return [
    `UPDATE purchases SET purchased_at = ${ts(startDays)}, expires_at = ${ts(startDays + 7)}, source_updated_at = ${ts(startDays)} WHERE customer_id = ${q(customer)} AND store = 'trial'`,
    `UPDATE devices SET first_seen_at = ${ts(startDays)} WHERE customer_id = ${q(customer)}`,
    `UPDATE customers SET created_at = ${ts(startDays)} WHERE id = ${q(customer)}`,
    `UPDATE entitlement_events SET occurred_at = ${ts(startDays)}, published_at = ${ts(startDays)} WHERE customer_id = ${q(customer)}`,
  ];
}

function purchase(p) {
  return `INSERT INTO purchases (customer_id, store, store_purchase_id, product_id, environment, status, period_type,
    purchased_at, expires_at, grace_expires_at, auto_renew, canceled_at, revoked_at, renewal_count, source_updated_at, raw)
    VALUES (${q(p.customer)}, ${q(p.store)}, ${q(p.id)}, ${q(p.product)}, ${q(p.env || 'production')}, ${q(p.status)}, 'normal',
    ${ts(p.purchased)}, ${p.expires === null ? 'NULL' : ts(p.expires)}, ${p.grace == null ? 'NULL' : ts(p.grace)},
    ${p.autoRenew ? 1 : 0}, ${p.canceled == null ? 'NULL' : ts(p.canceled)}, ${p.revoked == null ? 'NULL' : ts(p.revoked)},
    ${p.renewals || 0}, ${ts(p.updated ?? p.purchased)}, ${q(JSON.stringify({ seeded: true }))})`;
}
const pid = (store, id) => `(SELECT id FROM purchases WHERE store = ${q(store)} AND store_purchase_id = ${q(id)})`;
function event(customer, entitlement, kind, oldStatus, newStatus, purchaseRef, at) {
  return `INSERT INTO entitlement_events (customer_id, entitlement, kind, old_status, new_status, purchase_id, occurred_at, published_at)
    VALUES (${q(customer)}, ${q(entitlement)}, ${q(kind)}, ${q(oldStatus)}, ${q(newStatus)}, ${purchaseRef}, ${ts(at)}, ${ts(at)})`;
}
function receipt(customer, store, payload, at, outcome, error, purchaseRef) {
  return `INSERT INTO receipts (customer_id, store, payload, received_at, outcome, error, purchase_id)
    VALUES (${q(customer)}, ${q(store)}, ${q(JSON.stringify(payload))}, ${ts(at)}, ${q(outcome)}, ${q(error)}, ${purchaseRef})`;
}

// alice: a trial that ended and converted to an App Store subscription, and a
// lifetime add-on she bought on the App Store and got refunded.
await register('IOS', 'A7F3C2D1-alice-iphone', 'alice');
const aliceSub = '2000000812345678';
const aliceMaps = '2000000798765432';
sql([
  ...backdateTrial('alice', -10),
  purchase({ customer: 'alice', store: 'app_store', id: aliceMaps, product: 'com.example.maps.lifetime', status: 'refunded', purchased: -9, expires: null, revoked: -5, updated: -5 }),
  purchase({ customer: 'alice', store: 'app_store', id: aliceSub, product: 'com.example.pro.monthly', status: 'active', purchased: -3, expires: 27, autoRenew: true }),
  receipt('alice', 'app_store', { signedTransaction: 'eyJhbGciOiJFUzI1NiIsIng1YyI6WyJNSUlFTURDQ…' }, -9, 'valid', null, pid('app_store', aliceMaps)),
  receipt('alice', 'app_store', { signedTransaction: 'eyJhbGciOiJFUzI1NiIsIng1YyI6WyJNSUlCb2dD…' }, -3.01, 'invalid', 'the certificate chain does not lead to the Apple root', 'NULL'),
  receipt('alice', 'app_store', { signedTransaction: 'eyJhbGciOiJFUzI1NiIsIng1YyI6WyJNSUlFTURDQ…' }, -3, 'valid', null, pid('app_store', aliceSub)),
  event('alice', 'maps', 'granted', null, 'ACTIVE', pid('app_store', aliceMaps), -9),
  event('alice', 'maps', 'refunded', 'ACTIVE', 'REFUNDED', pid('app_store', aliceMaps), -5),
  event('alice', 'pro', 'product_changed', 'ACTIVE', 'ACTIVE', pid('app_store', aliceSub), -3),
]);

// bob: a Stripe subscription he canceled; the paid month still runs.
await register('WEB', 'bob-laptop', 'bob');
sql([
  ...backdateTrial('bob', -60),
  purchase({ customer: 'bob', store: 'stripe', id: 'sub_1QbobExample', product: 'price_pro_monthly', status: 'canceled', purchased: -50, expires: 10, canceled: -2, renewals: 1, updated: -2 }),
  event('bob', 'pro', 'granted', 'EXPIRED', 'ACTIVE', pid('stripe', 'sub_1QbobExample'), -50),
  event('bob', 'pro', 'canceled', 'ACTIVE', 'ACTIVE', pid('stripe', 'sub_1QbobExample'), -2),
]);

// carol: a Google Play renewal failed; she is in the grace period.
await register('ANDROID', 'carol-pixel-8', 'carol');
sql([
  ...backdateTrial('carol', -70),
  purchase({ customer: 'carol', store: 'play_store', id: 'gpa.3301-1234-5678-90123', product: 'pro_sub:monthly', status: 'in_grace_period', purchased: -61, expires: -1, grace: 6, autoRenew: true, renewals: 1, updated: -1 }),
  event('carol', 'pro', 'billing_issue', 'ACTIVE', 'ACTIVE', pid('play_store', 'gpa.3301-1234-5678-90123'), -1),
]);

// dave: a watch whose trial ran out and who never paid in production: the
// maps add-on he bought with a sandbox tester account counts for nothing on
// this server (accept_sandbox = false), nor does a plan the catalog dropped.
await register('GARMIN', 'dave-fenix-7', 'dave');
sql([
  ...backdateTrial('dave', -20),
  purchase({ customer: 'dave', store: 'app_store', id: '2000000555000111', product: 'com.example.maps.lifetime', env: 'sandbox', status: 'active', purchased: -15, expires: null }),
  purchase({ customer: 'dave', store: 'stripe', id: 'sub_1QdaveOldPlan', product: 'price_legacy_yearly', status: 'expired', purchased: -400, expires: -35, updated: -35 }),
]);

// erin: promotional access for life, granted by an operator.
await register('IOS', 'erin-ipad', 'erin');
await gql('mutation { grantEntitlement(customerId: "erin", entitlement: "maps") { id } }');

// Enough watches for more than one page of customers.
for (let i = 1; i <= 24; i++) await register('GARMIN', `watch-${String(i).padStart(3, '0')}`);

// The webhook log: a Stripe checkout recorded `unknown_product` before the
// catalog learnt its Payment Link (it knows it now, so a replay applies it),
// one that named no customer, an App Store notification that failed while
// Apple's API was down, and one that applied.
import { readFileSync } from 'node:fs';
const session = JSON.parse(readFileSync(new URL('../../../shared/vectors/stripe/object.checkout.session.json', import.meta.url)));
const stripeEvent = (id, sessionId, reference, at) => ({
  id, object: 'event', type: 'checkout.session.completed', api_version: '2024-06-20',
  created: Math.floor((now + at * DAY) / 1000), livemode: true, pending_webhooks: 0,
  request: { id: null, idempotency_key: null },
  data: { object: { ...session, id: sessionId, mode: 'payment', status: 'complete', payment_status: 'paid',
    livemode: true, client_reference_id: reference, customer: null, subscription: null, payment_link: 'plink_seed_maps',
    payment_intent: 'pi_' + sessionId } },
});
function webhook(source, eventId, payload, at, outcome, customer, error) {
  return `INSERT INTO webhook_events (source, event_id, received_at, payload, outcome, processed_at, customer_id, error, replayed_at)
    VALUES (${q(source)}, ${q(eventId)}, ${ts(at)}, ${q(JSON.stringify(payload))}, ${q(outcome)},
    ${outcome === 'failed' ? 'NULL' : ts(at)}, ${q(customer)}, ${q(error)}, NULL)`;
}
sql([
  webhook('stripe', 'evt_seed_unknown', stripeEvent('evt_seed_unknown', 'cs_seed_frank', 'frank', -1), -1, 'unknown_product', 'frank', null),
  webhook('stripe', 'evt_seed_nobody', stripeEvent('evt_seed_nobody', 'cs_seed_nobody', null, -0.5), -0.5, 'no_customer', null, null),
  webhook('app_store', 'f0000000-0000-4000-8000-00000000a11c',
    { notification: { notificationType: 'DID_RENEW', notificationUUID: 'f0000000-0000-4000-8000-00000000a11c' }, transaction: null, renewalInfo: null },
    -0.2, 'failed', 'alice', 'App Store Server API is unavailable, try again later'),
  webhook('stripe', 'evt_seed_bob', { id: 'evt_seed_bob', type: 'customer.subscription.updated' }, -2, 'applied', 'bob', null),
]);

console.log('seeded 29 customers');
