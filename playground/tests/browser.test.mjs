// Drives the dashboard in Debian's chromium as an operator would. Each check
// is counted; a failing check saves a screenshot and the run goes on where it
// can. The last line is "N passed, N failed".
import { chromium } from 'playwright-core';
import path from 'node:path';

const { BASE, ADMIN_KEY, ADMIN_TOKEN, CUSTOMER_TOKEN, SCREENSHOTS } = process.env;
const DAY = 86400e3;
const seedNow = Number(process.env.SEED_NOW) || Date.now();
// A date relative to when the seed ran, as the page prints it.
const day = (offset) => new Date(seedNow + offset * DAY).toISOString().slice(0, 10);
const today = () => new Date().toISOString().slice(0, 10);

let passed = 0;
let failed = 0;
const problems = [];

// Anything thrown outside a check still ends with the tally line.
process.on('uncaughtException', (e) => { console.log(`FAIL ${e.stack || e}`); console.log(`${passed} passed, ${failed + 1} failed`); process.exit(1); });
process.on('unhandledRejection', (e) => { console.log(`FAIL ${e && e.stack || e}`); console.log(`${passed} passed, ${failed + 1} failed`); process.exit(1); });

let browser;
try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
} catch (e) {
  console.log(`FAIL chromium does not start: ${e.message}`);
  console.log('0 passed, 1 failed');
  process.exit(1);
}
const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
const page = await context.newPage();
page.setDefaultTimeout(10000);
const consoleErrors = [];
// The refused sign-in answers 401 on purpose; chromium logs that as an error.
page.on('console', (m) => {
  if (m.type() === 'error' && !/status of 401/.test(m.text())) consoleErrors.push(m.text());
});
page.on('pageerror', (e) => consoleErrors.push(String(e)));
// Only this server may be contacted.
const foreign = [];
page.on('request', (r) => { if (!r.url().startsWith(BASE) && !r.url().startsWith('data:')) foreign.push(r.url()); });

const shot = (name) => page.screenshot({ path: path.join(SCREENSHOTS, name + '.png'), fullPage: true });

async function check(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok   ${name}`);
  } catch (e) {
    failed++;
    problems.push(name);
    console.log(`FAIL ${name}\n     ${String(e.message || e).split('\n').slice(0, 6).join('\n     ')}`);
    await shot('failed-' + name.replace(/[^a-z0-9]+/gi, '-').toLowerCase()).catch(() => {});
  }
}
function expect(cond, msg) { if (!cond) throw new Error(msg); }
const text = (sel) => page.locator(sel).innerText();
const entitlement = (key) => page.locator(`#entitlements [data-entitlement="${key}"]`);
async function waitText(locator, needle, timeout = 10000) {
  const deadline = Date.now() + timeout;
  let last = '';
  while (Date.now() < deadline) {
    last = await locator.innerText().catch(() => '');
    if (typeof needle === 'string' ? last.includes(needle) : needle.test(last)) return last;
    await page.waitForTimeout(100);
  }
  throw new Error(`expected ${needle} in: ${last.slice(0, 400)}`);
}
async function adminGql(query, variables) {
  const r = await fetch(BASE + '/graphql', {
    method: 'POST', headers: { 'content-type': 'application/json', 'api-key': ADMIN_KEY },
    body: JSON.stringify({ query, variables }),
  });
  return r.json();
}

try {
  await check('page loads and asks for a key', async () => {
    const resp = await page.goto(BASE + '/playground');
    expect(resp.status() === 200, `status ${resp.status()}`);
    await page.locator('#signin-view').waitFor({ state: 'visible' });
    expect(await page.locator('#customers-view').isHidden(), 'customers shown before sign-in');
    await shot('01-sign-in');
  });

  await check('a wrong key is refused', async () => {
    await page.fill('#signin-secret', 'ek_not_a_real_key');
    await page.click('#signin-submit');
    await waitText(page.locator('#signin-error'), 'refused');
    expect(await page.locator('#customers-view').isHidden(), 'signed in with a bad key');
  });

  await check('sign in with the admin key; it stays in session storage only', async () => {
    await page.fill('#signin-secret', ADMIN_KEY);
    await page.click('#signin-submit');
    await page.locator('#customers-view').waitFor({ state: 'visible' });
    await page.locator('#customers-table tbody tr[data-customer]').first().waitFor();
    const store = await page.evaluate(() => ({ session: JSON.stringify(sessionStorage), local: localStorage.length, cookie: document.cookie }));
    expect(store.session.includes(ADMIN_KEY.slice(0, 12)), 'key not in sessionStorage');
    expect(store.local === 0 && store.cookie === '', 'key leaked to localStorage or cookies');
  });

  await check('overview: customers with access now and the 30-day chart from the seeded change log', async () => {
    await page.click('[data-nav="overview"]');
    await page.locator('#overview-view').waitFor({ state: 'visible' });
    await page.locator('#overview-now [data-tile="access"]').waitFor();
    const tile = async (id) => (await page.locator(`#overview-now [data-tile="${id}"] .value`).innerText()).trim();
    // alice (App Store), bob (Stripe, canceled but paid up), carol (Play,
    // grace period), erin (promotional) and 24 watches on their trial.
    const want = { access: '28', 'store-APP_STORE': '1', 'store-PLAY_STORE': '1', 'store-STRIPE': '1',
      'store-PROMOTIONAL': '1', 'store-TRIAL': '25', trial: '24', grace: '1', retry: '0' };
    for (const [id, v] of Object.entries(want)) expect(await tile(id) === v, `${id}: ${await tile(id)} (want ${v})`);
    const days = page.locator('#overview-svg g.day');
    expect(await days.count() === 30, `days: ${await days.count()}`);
    const bar = (d, series) => page.locator(`#overview-svg g.day[data-day="${d}"] rect[data-series="${series}"]`);
    const value = async (d, series) => ((await bar(d, series).count()) ? Number(await bar(d, series).getAttribute('data-value')) : 0);
    const seen = {
      [`${day(0)} newTrials`]: await value(day(0), 'newTrials'),
      [`${day(-10)} newTrials`]: await value(day(-10), 'newTrials'),
      [`${day(-20)} newTrials`]: await value(day(-20), 'newTrials'),
      [`${day(-9)} trialConversions`]: await value(day(-9), 'trialConversions'),
      [`${day(-5)} refunds`]: await value(day(-5), 'refunds'),
      [`${day(-2)} cancellations`]: await value(day(-2), 'cancellations'),
    };
    const expected = {
      [`${day(0)} newTrials`]: 25, [`${day(-10)} newTrials`]: 1, [`${day(-20)} newTrials`]: 1,
      [`${day(-9)} trialConversions`]: 1, [`${day(-5)} refunds`]: 1, [`${day(-2)} cancellations`]: 1,
    };
    expect(JSON.stringify(seen) === JSON.stringify(expected), `bars ${JSON.stringify(seen)}`);
    const legend = await text('#overview-chart .legend');
    for (const t of ['New trials (27)', 'Trial → paid (1)', 'Renewals (0)', 'Cancellations (1)', 'Refunds (1)']) {
      expect(legend.includes(t), `legend: ${legend}`);
    }
    await shot('01b-overview');
    await page.click('[data-nav="customers"]');
    await page.locator('#customers-view').waitFor({ state: 'visible' });
  });

  await check('customers are listed and paginated', async () => {
    const rows = page.locator('#customers-table tbody tr[data-customer]');
    expect(await rows.count() === 20, `page 1 has ${await rows.count()} rows`);
    expect(await rows.first().getAttribute('data-customer') === 'alice', 'ordered by id');
    await page.click('#next-page');
    await waitText(page.locator('#page-label'), 'Page 2');
    await page.waitForFunction(() => document.querySelectorAll('#customers-table tbody tr[data-customer]').length === 9);
    expect(await page.locator('#next-page').isDisabled(), 'next enabled on the last page');
    await page.click('#prev-page');
    await page.waitForFunction(() => document.querySelector('#customers-table tbody tr[data-customer]')?.dataset.customer === 'alice');
    await shot('02-customers');
  });

  await check('search by id prefix', async () => {
    await page.fill('#search', 'ali');
    await page.press('#search', 'Enter');
    await page.waitForFunction(() => {
      const rows = [...document.querySelectorAll('#customers-table tbody tr[data-customer]')];
      return rows.length === 1 && rows[0].dataset.customer === 'alice';
    });
    await page.fill('#search', 'nobody-');
    await page.press('#search', 'Enter');
    await waitText(page.locator('#customers-table tbody'), 'No customer matches');
    await page.fill('#search', 'ali');
    await page.press('#search', 'Enter');
    await page.locator('#customers-table tbody tr[data-customer="alice"]').waitFor();
  });

  await check('open a customer: entitlements with their reasons', async () => {
    await page.click('#customers-table tbody tr[data-customer="alice"] a');
    await page.locator('#customer-view').waitFor({ state: 'visible' });
    const pro = await waitText(entitlement('pro'), 'Active: the App Store subscription com.example.pro.monthly is paid until ' + day(27));
    expect(/it will renew then\./.test(pro), `pro explanation: ${pro}`);
    expect(/source: App Store/.test(pro) && /com\.example\.pro\.monthly/.test(pro), `pro facts: ${pro}`);
    expect(await entitlement('pro').getAttribute('data-active') === 'true', 'pro not active');
    await waitText(entitlement('maps'), 'Not active: the App Store lifetime purchase com.example.maps.lifetime was refunded on ' + day(-5));
    expect(await entitlement('maps').getAttribute('data-active') === 'false', 'maps active');
    expect((await text('#customer-status')) === 'paid', 'paid status');
  });

  await check('purchases: trial, App Store purchase and refund each explained', async () => {
    const row = (store, status) => page.locator(`#purchases tr[data-store="${store}"][data-status="${status}"]`);
    expect(await page.locator('#purchases tr[data-purchase]').count() === 3, 'three purchases');
    // The server's sentences, not the page's.
    const trial = await row('TRIAL', 'EXPIRED').innerText();
    expect(trial.includes('Grants nothing: the free trial ended on ' + day(-3)), `trial row: ${trial}`);
    const sub = await row('APP_STORE', 'ACTIVE').innerText();
    expect(sub.includes('Grants pro: the App Store subscription com.example.pro.monthly is paid until ' + day(27))
      && sub.includes('it will renew then.'), `subscription row: ${sub}`);
    const refund = await row('APP_STORE', 'REFUNDED').innerText();
    expect(refund.includes('Grants nothing: the App Store lifetime purchase com.example.maps.lifetime was refunded on ' + day(-5)), `refund row: ${refund}`);
  });

  await check('timeline draws one bar per purchase, colored by status', async () => {
    const bars = page.locator('#timeline-svg g.bar');
    expect(await bars.count() === 3, `bars: ${await bars.count()}`);
    const statuses = await bars.evaluateAll((gs) => gs.map((g) => g.dataset.status).sort());
    expect(JSON.stringify(statuses) === JSON.stringify(['ACTIVE', 'EXPIRED', 'REFUNDED']), statuses.join());
    const fills = await bars.evaluateAll((gs) => gs.map((g) => [g.dataset.status, g.querySelector('rect').getAttribute('fill')]));
    const refundFill = fills.find(([s]) => s === 'REFUNDED')[1];
    const activeFill = fills.find(([s]) => s === 'ACTIVE')[1];
    expect(refundFill !== activeFill, 'refund and active share a color');
  });

  await check('devices, receipts and change log are shown', async () => {
    await waitText(page.locator('#devices'), 'A7F3C2D1-alice-iphone');
    const receipts = await text('#receipts');
    expect(/invalid/.test(receipts) && /certificate chain/.test(receipts), `receipts: ${receipts}`);
    expect(await page.locator('#receipts tr[data-receipt]').count() === 3, 'three receipts');
    const log = await text('#events');
    expect(/refunded/.test(log) && /ACTIVE → REFUNDED/.test(log), `events: ${log}`);
    await shot('03-customer-alice');
  });

  await check('grant a promotional entitlement with confirmation', async () => {
    const before = await page.locator('#events tr[data-event]').count();
    await page.selectOption('#grant-entitlement', 'maps');
    const until = new Date(Date.now() + 14 * DAY).toISOString().slice(0, 10);
    await page.fill('#grant-date', until);
    await page.click('#grant-submit');
    await page.locator('#confirm').waitFor({ state: 'visible' });
    const ask = await text('#confirm-text');
    expect(ask.includes('maps') && ask.includes(until), `confirmation: ${ask}`);
    // Cancel first: nothing may change.
    await page.click('#confirm-cancel');
    await page.waitForTimeout(300);
    expect(await entitlement('maps').getAttribute('data-active') === 'false', 'cancel still granted');
    await page.click('#grant-submit');
    await page.click('#confirm-ok');
    await waitText(entitlement('maps'), 'Active: the promotional grant runs until ' + until);
    expect(await entitlement('maps').getAttribute('data-active') === 'true', 'maps not active after grant');
    await page.waitForFunction((n) => document.querySelectorAll('#events tr[data-event]').length > n, before);
    await waitText(page.locator('#events'), 'granted');
    expect(await page.locator('#purchases tr[data-store="PROMOTIONAL"]').count() === 1, 'no promotional purchase row');
    await shot('04-granted');
  });

  await check('revoke the grant with confirmation', async () => {
    await page.click('#entitlements [data-revoke="maps"]');
    await page.locator('#confirm').waitFor({ state: 'visible' });
    await page.click('#confirm-ok');
    await waitText(entitlement('maps'), 'Not active: the promotional grant was revoked on ' + today());
    expect(await entitlement('maps').getAttribute('data-active') === 'false', 'maps still active');
    expect(await page.locator('#entitlements [data-revoke]').count() === 0, 'revoke button left');
    await waitText(page.locator('#events tr[data-event]').first(), 'revoked');
    // The App Store subscription is untouched.
    expect(await entitlement('pro').getAttribute('data-active') === 'true', 'pro lost');
  });

  await check('a change made elsewhere shows up while the page is open', async () => {
    // The page holds an acknowledged entitlementChanged subscription.
    await page.waitForFunction(() => document.querySelector('#live').dataset.push === 'on', null, { timeout: 5000 });
    const r = await adminGql('mutation { grantEntitlement(customerId: "alice", entitlement: "maps") { id } }');
    expect(!r.errors, JSON.stringify(r));
    await waitText(entitlement('maps'), 'Active: the promotional grant has no end date.', 12000);
    await waitText(page.locator('#live'), /updated|live/);
    await shot('05-live-update');
    const r2 = await adminGql('mutation { revokeGrant(customerId: "alice", entitlement: "maps") { id } }');
    expect(!r2.errors, JSON.stringify(r2));
    await waitText(entitlement('maps'), 'inactive', 12000);
  });

  await check('other customers read right: canceled, grace period, expired trial', async () => {
    await page.goto(BASE + '/playground#/customers/bob');
    await waitText(entitlement('pro'), new RegExp('Active: the Stripe subscription \\S+ was canceled; the paid period runs until ' + day(10)));
    await page.goto(BASE + '/playground#/customers/carol');
    await waitText(entitlement('pro'), new RegExp('Active in a grace period: the Google Play subscription \\S+ could not be renewed; access continues until ' + day(6)));
    await page.goto(BASE + '/playground#/customers/dave');
    await waitText(entitlement('pro'), 'Not active: the free trial ended on ' + day(-13));
    expect((await text('#customer-status')) === 'expired', 'dave not expired');
    await page.goto(BASE + '/playground#/customers/nobody-here');
    await waitText(page.locator('#customer-error'), 'No customer has the id');
  });

  await check('a sandbox purchase grants nothing when the server refuses sandbox, and says so', async () => {
    await page.goto(BASE + '/playground#/customers/dave');
    const ignored = 'sandbox purchases are ignored in production (accept_sandbox = false).';
    await waitText(entitlement('maps'), 'Not active: the App Store sandbox lifetime purchase com.example.maps.lifetime would give access for life, but ' + ignored);
    expect(await entitlement('maps').getAttribute('data-active') === 'false', 'maps active from a sandbox purchase');
    const sandbox = page.locator('#purchases tr[data-store="APP_STORE"]');
    await sandbox.waitFor();
    const row = await sandbox.innerText();
    expect(row.includes('Grants nothing: the App Store sandbox lifetime purchase com.example.maps.lifetime would grant maps for life, but ' + ignored), `sandbox row: ${row}`);
    expect(!/Grants maps/.test(row), `sandbox row reads as granting: ${row}`);
    expect(await sandbox.locator('.badge.warn').innerText() === 'sandbox', 'no sandbox badge');
    const old = await page.locator('#purchases tr[data-store="STRIPE"]').innerText();
    expect(old.includes('Grants nothing: the Stripe product price_legacy_yearly is not in the catalog.'), `unmapped row: ${old}`);
    const trial = await page.locator('#purchases tr[data-store="TRIAL"]').innerText();
    expect(trial.includes('Grants nothing: the free trial ended on ' + day(-13)), `trial row: ${trial}`);
    expect((await text('#customer-status')) === 'expired', 'dave not expired');
    await shot('06b-sandbox-ignored');
  });

  await check('a lifetime grant turns an expired customer paid, and back', async () => {
    await page.goto(BASE + '/playground#/customers/dave');
    await waitText(entitlement('pro'), 'Not active: the free trial ended on');
    await page.selectOption('#grant-entitlement', 'pro');
    await page.check('#grant-form input[name=until][value=lifetime]');
    await page.click('#grant-submit');
    await waitText(page.locator('#confirm-text'), 'for life');
    await page.click('#confirm-ok');
    await waitText(entitlement('pro'), 'Active: the promotional grant has no end date.');
    await waitText(page.locator('#customer-status'), 'paid');
    await page.click('#entitlements [data-revoke="pro"]');
    await page.click('#confirm-ok');
    await waitText(entitlement('pro'), 'Not active: the promotional grant was revoked on ' + today());
    await waitText(page.locator('#customer-status'), 'expired');
  });

  await check('a customer page lists the store deliveries that touched them', async () => {
    await page.goto(BASE + '/playground#/customers/alice');
    const row = page.locator('#deliveries tr[data-outcome="failed"]');
    await row.waitFor();
    const t = await row.innerText();
    expect(t.includes('App Store') && t.includes('DID_RENEW') && t.includes('unavailable'), `delivery: ${t}`);
    await page.goto(BASE + '/playground#/customers/bob');
    await waitText(page.locator('#deliveries'), 'customer.subscription.updated');
    expect(await page.locator('#deliveries button.replay').count() === 0, 'an applied delivery offers a replay');
  });

  await check('webhooks: unmatched and failed deliveries are listed, applied ones are not', async () => {
    await page.click('[data-nav="webhooks"]');
    await page.locator('#webhooks-view').waitFor({ state: 'visible' });
    await page.locator('#webhooks-table tbody tr[data-webhook]').first().waitFor();
    const outcomes = await page.locator('#webhooks-table tbody tr[data-webhook]').evaluateAll((rs) => rs.map((r) => r.dataset.outcome));
    expect(JSON.stringify(outcomes) === JSON.stringify(['failed', 'no_customer', 'unknown_product']), `outcomes ${outcomes}`);
    const unknown = await page.locator('#webhooks-table tr[data-outcome="unknown_product"]').innerText();
    expect(unknown.includes('checkout.session.completed') && unknown.includes('frank') && unknown.includes('unknown product'), unknown);
    await page.selectOption('#webhooks-outcome', '*');
    await page.click('#webhooks-filter button[type=submit]');
    await page.waitForFunction(() => document.querySelectorAll('#webhooks-table tbody tr[data-webhook]').length === 4);
    await page.selectOption('#webhooks-store', 'APP_STORE');
    await page.click('#webhooks-filter button[type=submit]');
    await page.waitForFunction(() => document.querySelectorAll('#webhooks-table tbody tr[data-webhook]').length === 1);
    await page.selectOption('#webhooks-outcome', '');
    await page.selectOption('#webhooks-store', '');
    await page.click('#webhooks-filter button[type=submit]');
    await page.waitForFunction(() => document.querySelectorAll('#webhooks-table tbody tr[data-webhook]').length === 3);
    await shot('08-webhooks');
  });

  await check('replay asks first, then grants what the fixed catalog now matches, once', async () => {
    const row = page.locator('#webhooks-table tr[data-outcome="unknown_product"]');
    await row.locator('button.replay').click();
    await page.locator('#confirm').waitFor({ state: 'visible' });
    const ask = await text('#confirm-text');
    expect(ask.includes('evt_seed_unknown') && ask.includes('Replay'), `confirmation: ${ask}`);
    await page.click('#confirm-cancel');
    await page.waitForTimeout(300);
    let r = await adminGql('{ customer(id: "frank") { id } }');
    expect(r.data.customer === null, 'cancel replayed anyway');
    await row.locator('button.replay').click();
    await page.click('#confirm-ok');
    await waitText(page.locator('#toast'), 'Replayed evt_seed_unknown: applied');
    await page.waitForFunction(() => !document.querySelector('#webhooks-table tr[data-outcome="unknown_product"]'));
    r = await adminGql('{ customer(id: "frank") { entitlements { key isActive } events { kind } webhookEvents { outcome replayedAt } } }');
    const maps = r.data.customer.entitlements.find((e) => e.key === 'maps');
    expect(maps.isActive, JSON.stringify(r));
    expect(r.data.customer.events.length === 1, `change log: ${JSON.stringify(r.data.customer.events)}`);
    expect(r.data.customer.webhookEvents[0].outcome === 'applied' && r.data.customer.webhookEvents[0].replayedAt, JSON.stringify(r));
    // A second replay changes nothing.
    const id = (await adminGql('{ webhookEvents(outcome: ["applied"], customerId: "frank") { nodes { id } } }')).data.webhookEvents.nodes[0].id;
    r = await adminGql('mutation($id: ID!) { replayWebhookEvent(id: $id) { outcome ran } }', { id });
    expect(r.data.replayWebhookEvent.ran === false && r.data.replayWebhookEvent.outcome === 'applied', JSON.stringify(r));
    r = await adminGql('{ customer(id: "frank") { events { kind } } }');
    expect(r.data.customer.events.length === 1, 'second replay wrote to the change log');
    await page.goto(BASE + '/playground#/customers/frank');
    await waitText(page.locator('#deliveries'), 'applied');
    await shot('09-replayed');
  });

  await check('explorer offers an example for every query and mutation', async () => {
    await page.goto(BASE + '/playground#/customers/alice');
    await page.locator('#entitlements [data-entitlement]').first().waitFor();
    await page.click('[data-nav="explorer"]');
    await page.locator('#explorer-view').waitFor({ state: 'visible' });
    await page.waitForFunction(() => document.querySelectorAll('#examples option').length > 0);
    const intro = await adminGql('{ __schema { queryType { fields { name } } mutationType { fields { name } } } }');
    const want = [...intro.data.__schema.queryType.fields.map((f) => 'query.' + f.name),
      ...intro.data.__schema.mutationType.fields.map((f) => 'mutation.' + f.name)].sort();
    const have = (await page.locator('#examples option').evaluateAll((os) => os.map((o) => o.value))).sort();
    expect(JSON.stringify(want) === JSON.stringify(have), `want ${want} have ${have}`);
  });

  await check('explorer runs an example query', async () => {
    await page.selectOption('#examples', 'query.customer');
    const vars = JSON.parse(await page.inputValue('#variables'));
    expect(vars.id === 'alice', `variables ${JSON.stringify(vars)}`);
    await page.click('#run');
    const out = await waitText(page.locator('#result'), '"id": "alice"');
    expect(out.includes('HTTP 200') && out.includes('"isActive": true'), out.slice(0, 300));
    await page.selectOption('#examples', 'query.products');
    await page.click('#editor');
    await page.keyboard.press('Control+Enter');
    await waitText(page.locator('#result'), '"com.example.maps.lifetime"');
  });

  await check('every example operation passes the server validation', async () => {
    const ids = await page.locator('#examples option').evaluateAll((os) => os.map((o) => o.value));
    const bad = [];
    for (const id of ids) {
      await page.selectOption('#examples', id);
      await page.evaluate(() => { document.getElementById('result').textContent = ''; });
      await page.click('#run');
      const out = await waitText(page.locator('#result'), 'HTTP ');
      const body = JSON.parse(out.slice(out.indexOf('\n') + 1));
      // Valid means it reached the resolvers: an error may only come from one
      // (it has a path), with a code, and never INTERNAL. `me` and the store
      // mutations need a customer token or a configured store, which this
      // admin session on a store-less server does not have.
      const fromResolvers = (errs) => errs.every((e) => Array.isArray(e.path) && e.extensions && e.extensions.code && e.extensions.code !== 'INTERNAL');
      const ok = body.errors ? fromResolvers(body.errors) : !!body.data;
      if (!ok) bad.push(`${id}: ${JSON.stringify(body).slice(0, 200)}`);
    }
    expect(!bad.length, bad.join('\n'));
  });

  await check('explorer completes field names from the schema', async () => {
    await page.fill('#editor', '');
    await page.click('#editor');
    await page.keyboard.type('query {\n  custo');
    await page.locator('#completions').waitFor({ state: 'visible' });
    const labels = await page.locator('#completions li').evaluateAll((ls) => ls.map((l) => l.dataset.label));
    expect(labels.includes('customer') && labels.includes('customers') && !labels.includes('products'), labels.join());
    await shot('06-explorer-completion');
    await page.keyboard.press('ArrowDown');
    await page.keyboard.press('Enter');
    await page.keyboard.type('(first: 2) {\n    nodes { pai');
    await page.locator('#completions li[data-label="paidStatus"]').waitFor();
    await page.keyboard.press('Enter');
    await page.keyboard.type(' id }\n  }\n}');
    expect((await page.inputValue('#editor')).includes('customers(first: 2) {\n    nodes { paidStatus id }'), await page.inputValue('#editor'));
    await page.fill('#variables', '{}');
    await page.click('#run');
    await waitText(page.locator('#result'), '"paidStatus": "PAID"');
    await shot('07-explorer-result');
  });

  await check('sign out forgets the key', async () => {
    await page.click('#signout');
    await page.locator('#signin-view').waitFor({ state: 'visible' });
    const s = await page.evaluate(() => sessionStorage.length);
    expect(s === 0, 'session storage not cleared');
  });

  await check('a customer token is not enough; an admin token signs in', async () => {
    await page.fill('#signin-secret', CUSTOMER_TOKEN);
    await page.click('#signin-submit');
    await waitText(page.locator('#signin-error'), 'not an admin one');
    await page.fill('#signin-secret', ADMIN_TOKEN);
    await page.click('#signin-submit');
    await page.locator('#customers-table tbody tr[data-customer]').first().waitFor();
    await waitText(page.locator('#whoami'), 'token');
    await page.click('#customers-table tbody tr[data-customer="bob"] a');
    await waitText(entitlement('pro'), /Stripe subscription \S+ was canceled/);
  });

  await check('no script errors, CSP violations or outside requests', async () => {
    expect(consoleErrors.length === 0, consoleErrors.join('\n'));
    expect(foreign.length === 0, foreign.join('\n'));
  });
} finally {
  await browser.close();
}

if (problems.length) console.log('failed: ' + problems.join('; '));
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
