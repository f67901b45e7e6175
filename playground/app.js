// Entitle operator dashboard. Plain browser JavaScript, no build step and no
// third-party code: everything goes through the public GraphQL API with the
// key or token the operator typed in, kept in sessionStorage only.
'use strict';

(function () {
  const BASE = location.pathname.replace(/\/playground\/?.*$/, '');
  const ENDPOINT = BASE + '/graphql';
  const STORAGE_KEY = 'entitle.playground.auth';
  const POLL_MS = 4000;
  const PAGE_SIZE = 20;

  // ---------- small helpers ----------

  const $ = (id) => document.getElementById(id);

  // Builds DOM with text nodes only, so customer data can never become markup.
  function h(tag, attrs, ...children) {
    const svg = ['svg', 'g', 'rect', 'line', 'text', 'title', 'path', 'circle', 'pattern', 'defs'].includes(tag);
    const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.setAttribute('class', v);
      else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function fill(el, ...children) {
    el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
      .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  }

  function showError(el, msg) {
    if (!msg) { el.hidden = true; el.textContent = ''; return; }
    el.textContent = msg;
    el.hidden = false;
  }

  let toastTimer = null;
  function toast(msg, bad) {
    const t = $('toast');
    t.textContent = msg;
    t.className = 'toast' + (bad ? ' bad' : '');
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, 5000);
  }

  const pad = (n) => String(n).padStart(2, '0');
  function fmtDate(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
  }
  function fmtTime(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    return `${fmtDate(iso)} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())} UTC`;
  }
  function relative(iso) {
    if (!iso) return '';
    const diff = new Date(iso).getTime() - Date.now();
    const abs = Math.abs(diff);
    const units = [['day', 86400e3], ['hour', 3600e3], ['minute', 60e3]];
    for (const [name, ms] of units) {
      if (abs >= ms) {
        const n = Math.round(abs / ms);
        const s = `${n} ${name}${n === 1 ? '' : 's'}`;
        return diff >= 0 ? `in ${s}` : `${s} ago`;
      }
    }
    return diff >= 0 ? 'in a moment' : 'just now';
  }
  function when(iso) {
    if (!iso) return '';
    return h('time', { datetime: iso, title: `${iso} (${relative(iso)})` }, fmtTime(iso));
  }

  const STORE_NAMES = {
    APP_STORE: 'App Store', PLAY_STORE: 'Google Play', STRIPE: 'Stripe',
    PROMOTIONAL: 'Promotional grant', TRIAL: 'Free trial',
  };
  const STATUS_NAMES = {
    ACTIVE: 'active', TRIALING: 'in store trial', CANCELED: 'canceled', IN_GRACE_PERIOD: 'in grace period',
    IN_BILLING_RETRY: 'in billing retry', ON_HOLD: 'on hold', PAUSED: 'paused', EXPIRED: 'expired',
    REFUNDED: 'refunded', REVOKED: 'revoked', PENDING: 'pending',
  };
  const storeName = (s) => STORE_NAMES[s] || s || '';
  const statusClass = (s) => ({
    ACTIVE: 'active', TRIALING: 'trial', CANCELED: 'warn', IN_GRACE_PERIOD: 'warn', IN_BILLING_RETRY: 'bad',
    ON_HOLD: 'bad', PAUSED: 'warn', EXPIRED: 'expired', REFUNDED: 'bad', REVOKED: 'bad', PENDING: 'warn',
  })[s] || '';

  // ---------- session and transport ----------

  let auth = null; // { kind: 'key' | 'bearer', secret }

  function loadAuth() {
    try { auth = JSON.parse(sessionStorage.getItem(STORAGE_KEY) || 'null'); } catch (_) { auth = null; }
  }
  function saveAuth(a) {
    auth = a;
    if (a) sessionStorage.setItem(STORAGE_KEY, JSON.stringify(a));
    else sessionStorage.removeItem(STORAGE_KEY);
  }

  class GqlError extends Error {
    constructor(message, code, status) { super(message); this.code = code; this.status = status; }
  }

  async function gql(query, variables, opts) {
    const headers = { 'content-type': 'application/json', accept: 'application/json' };
    const a = (opts && opts.auth) || auth;
    if (a && a.kind === 'bearer') headers.authorization = 'Bearer ' + a.secret;
    else if (a) headers['api-key'] = a.secret;
    let resp;
    try {
      resp = await fetch(ENDPOINT, {
        method: 'POST', headers, credentials: 'omit', cache: 'no-store',
        body: JSON.stringify({ query, variables: variables || {} }),
      });
    } catch (e) {
      throw new GqlError('The server cannot be reached (' + e.message + ')', 'NETWORK', 0);
    }
    let body = null;
    try { body = await resp.json(); } catch (_) { /* not JSON */ }
    if (opts && opts.raw) return { status: resp.status, body };
    if (body && body.error) throw new GqlError(body.error.message, body.error.code, resp.status);
    if (!resp.ok && !(body && body.data)) throw new GqlError(`HTTP ${resp.status}`, 'HTTP', resp.status);
    if (body && body.errors && body.errors.length) {
      const e = body.errors[0];
      throw new GqlError(e.message, e.extensions && e.extensions.code, resp.status);
    }
    return body.data;
  }

  function onAuthFailure(e) {
    if (e && (e.code === 'UNAUTHENTICATED' || e.status === 401)) {
      saveAuth(null);
      route();
      showError($('signin-error'), 'Your key or token was refused; sign in again.');
      return true;
    }
    return false;
  }

  // ---------- routing ----------

  let pollTimer = null;
  let currentCustomerId = null;

  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, '');
    const [path, qs] = raw.split('?');
    const params = new URLSearchParams(qs || '');
    const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
    return { parts, params };
  }

  function showView(name) {
    for (const v of ['signin', 'overview', 'customers', 'customer', 'webhooks', 'explorer']) $(v + '-view').hidden = v !== name;
    for (const a of document.querySelectorAll('[data-nav]')) {
      a.classList.toggle('current', a.dataset.nav === name || (name === 'customer' && a.dataset.nav === 'customers'));
    }
    const signedIn = !!auth;
    $('nav').hidden = !signedIn;
    $('signout').hidden = !signedIn;
    $('whoami').hidden = !signedIn;
    if (signedIn) {
      $('whoami').textContent = (auth.kind === 'bearer' ? 'token ' : 'key ') + auth.secret.slice(0, 8) + '…';
    }
  }

  function route() {
    stopPolling();
    $('toast').hidden = true;
    if (!auth) { showView('signin'); $('signin-secret').focus(); return; }
    const { parts, params } = parseHash();
    if (parts[0] === 'customers' && parts.length > 1) {
      showView('customer');
      openCustomer(parts.slice(1).join('/'));
    } else if (parts[0] === 'overview') {
      showView('overview');
      openOverview();
    } else if (parts[0] === 'webhooks') {
      showView('webhooks');
      listWebhooks(false);
    } else if (parts[0] === 'explorer') {
      showView('explorer');
      window.EntitleExplorer.open({ gql, currentCustomerId: () => currentCustomerId, onAuthFailure });
    } else {
      showView('customers');
      listCustomers(params.get('search') || '', params.get('after') || null);
    }
  }

  // ---------- sign-in ----------

  function detectKind(secret) {
    return /^[\w-]+\.[\w-]+\.[\w-]*$/.test(secret) ? 'bearer' : 'key';
  }

  async function signIn(ev) {
    ev.preventDefault();
    const secret = $('signin-secret').value.trim();
    let kind = new FormData($('signin-form')).get('kind');
    if (kind === 'auto') kind = detectKind(secret);
    showError($('signin-error'), null);
    $('signin-submit').disabled = true;
    try {
      // Listing customers needs the admin role: it proves the key is fit for this page.
      await gql('query SignInCheck { customers(first: 1) { pageInfo { hasNextPage } } }', {}, { auth: { kind, secret } });
      saveAuth({ kind, secret });
      $('signin-secret').value = '';
      if (!location.hash || location.hash === '#' || location.hash === '#/') location.hash = '#/customers';
      route();
    } catch (e) {
      const msg = e.code === 'FORBIDDEN'
        ? 'This key or token works but is not an admin one; the dashboard needs the admin role.'
        : e.code === 'UNAUTHENTICATED' ? 'The server refused this key or token.' : e.message;
      showError($('signin-error'), msg);
    } finally {
      $('signin-submit').disabled = false;
    }
  }

  // ---------- customers list ----------

  const cursorStack = []; // cursors of earlier pages, for "Previous"
  let listState = { search: '', after: null, endCursor: null, hasNext: false, page: 1 };

  const LIST_QUERY = `query CustomerList($first: Int!, $after: String, $search: String) {
  customers(first: $first, after: $after, search: $search) {
    pageInfo { hasNextPage endCursor }
    nodes { id createdAt paidStatus trialEndsAt entitlements { key isActive expiresAt store } }
  }
}`;

  async function listCustomers(search, after) {
    $('search').value = search;
    showError($('customers-error'), null);
    const tbody = $('customers-table').querySelector('tbody');
    try {
      const data = await gql(LIST_QUERY, { first: PAGE_SIZE, after, search: search || null });
      const conn = data.customers;
      if (search !== listState.search) { cursorStack.length = 0; listState.page = 1; }
      listState = { ...listState, search, after, endCursor: conn.pageInfo.endCursor, hasNext: conn.pageInfo.hasNextPage };
      if (!after) { cursorStack.length = 0; listState.page = 1; }
      fill(tbody, conn.nodes.length ? conn.nodes.map(customerRow)
        : h('tr', {}, h('td', { colspan: 5, class: 'empty' }, search ? `No customer matches “${search}”.` : 'No customers yet.')));
      $('next-page').disabled = !listState.hasNext;
      $('prev-page').disabled = !after;
      $('page-label').textContent = `Page ${listState.page}`;
    } catch (e) {
      if (!onAuthFailure(e)) showError($('customers-error'), e.message);
    }
  }

  function customerRow(c) {
    const active = c.entitlements.filter((e) => e.isActive);
    const href = '#/customers/' + encodeURIComponent(c.id);
    return h('tr', { 'data-customer': c.id },
      h('td', {}, h('a', { href }, c.id)),
      h('td', {}, h('span', { class: 'badge ' + c.paidStatus.toLowerCase() }, c.paidStatus.toLowerCase())),
      h('td', {}, active.length ? active.map((e, i) => [i ? ', ' : '', h('strong', {}, e.key), ` (${storeName(e.store)}${e.expiresAt ? ', until ' + fmtDate(e.expiresAt) : ', lifetime'})`])
        : h('span', { class: 'muted' }, 'none')),
      h('td', {}, c.trialEndsAt ? when(c.trialEndsAt) : h('span', { class: 'muted' }, '—')),
      h('td', {}, when(c.createdAt)));
  }

  function goList(search, after) {
    const qs = new URLSearchParams();
    if (search) qs.set('search', search);
    if (after) qs.set('after', after);
    const target = '#/customers' + (qs.toString() ? '?' + qs : '');
    if (location.hash === target) route(); else location.hash = target;
  }

  // ---------- one customer ----------

  const CUSTOMER_QUERY = `query CustomerPage($id: ID!) {
  customer(id: $id) {
    id createdAt paidStatus trialEndsAt
    entitlements { key isActive expiresAt willRenew store productId periodType status gracePeriodExpiresAt purchaseId explanation }
    purchases { id store storePurchaseId productId environment status effectiveStatus periodType purchasedAt expiresAt graceExpiresAt autoRenew canceledAt revokedAt renewalCount sourceUpdatedAt explanation }
    devices { platform deviceId firstSeenAt lastSeenAt }
    receipts(limit: 20) { id store receivedAt outcome error purchaseId payload }
    events(limit: 40) { id entitlement kind oldStatus newStatus purchaseId occurredAt }
  }
}`;
  const PRODUCTS_QUERY = 'query Catalog { products { id displayName entitlements stripePriceId appStoreProductId playStoreProductId kind } }';

  let products = null;
  let lastJson = null;
  let lastCustomer = null;

  async function openCustomer(id) {
    currentCustomerId = id;
    lastJson = null;
    lastDeliveries = null;
    $('customer-title').textContent = id;
    fill($('customer-summary'));
    showError($('customer-error'), null);
    for (const s of ['entitlements', 'timeline', 'purchases', 'devices', 'receipts', 'events', 'deliveries']) fill($(s), h('p', { class: 'muted' }, 'Loading…'));
    if (!products) {
      try { products = (await gql(PRODUCTS_QUERY)).products; } catch (e) { products = []; }
    }
    await refreshCustomer(true);
    startPolling();
  }

  async function refreshCustomer(first) {
    const id = currentCustomerId;
    if (!id) return;
    try {
      const data = await gql(CUSTOMER_QUERY, { id });
      if (id !== currentCustomerId) return;
      if (data.customer) refreshDeliveries(id);
      setLive(true);
      if (!data.customer) {
        showError($('customer-error'), `No customer has the id “${id}”.`);
        for (const s of ['entitlements', 'timeline', 'purchases', 'devices', 'receipts', 'events', 'deliveries']) fill($(s));
        return;
      }
      const json = JSON.stringify(data.customer);
      if (json === lastJson) return;
      const changed = lastJson !== null;
      lastJson = json;
      renderCustomer(data.customer);
      if (changed && !first) flashLive();
    } catch (e) {
      if (onAuthFailure(e)) return;
      setLive(false, e.message);
      if (first) showError($('customer-error'), e.message);
    }
  }

  // Live updates: the entitlementChanged subscription over graphql-ws
  // pushes each change of this customer; polling stays as the fallback
  // (and catches purchase details that change without an entitlement event).
  let socket = null;
  function startPolling() {
    stopPolling();
    startSubscription(currentCustomerId);
    pollTimer = setInterval(() => {
      if (document.visibilityState === 'visible') refreshCustomer(false);
    }, POLL_MS);
  }
  function stopPolling() {
    if (pollTimer) clearInterval(pollTimer);
    pollTimer = null;
    if (socket) {
      const s = socket;
      socket = null;
      try { s.close(); } catch (_) { /* already closed */ }
    }
  }
  function startSubscription(customerId) {
    let s;
    try {
      s = new WebSocket(location.origin.replace(/^http/, 'ws') + '/graphql/ws', 'graphql-transport-ws');
    } catch (_) {
      return;
    }
    socket = s;
    const send = (m) => s.send(JSON.stringify(m));
    s.onopen = () => send({
      type: 'connection_init',
      payload: auth.kind === 'bearer' ? { Authorization: 'Bearer ' + auth.secret } : { 'api-key': auth.secret },
    });
    s.onmessage = (m) => {
      let msg;
      try { msg = JSON.parse(m.data); } catch (_) { return; }
      if (msg.type === 'connection_ack') {
        send({
          id: 'live',
          type: 'subscribe',
          payload: {
            query: 'subscription($c: ID) { entitlementChanged(customerId: $c) { eventId } }',
            variables: { c: customerId },
          },
        });
        $('live').dataset.push = 'on';
      } else if (msg.type === 'next' && socket === s && currentCustomerId === customerId) {
        refreshCustomer(false);
      } else if (msg.type === 'ping') {
        send({ type: 'pong' });
      }
    };
    s.onclose = () => {
      if (socket === s) {
        socket = null;
        $('live').dataset.push = 'off';
      }
    };
  }

  function setLive(ok, why) {
    const el = $('live');
    el.classList.toggle('on', ok);
    const d = new Date();
    el.textContent = ok ? `live · checked ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}` : `offline: ${why}`;
  }
  function flashLive() {
    const el = $('live');
    el.classList.add('flash');
    el.textContent = 'updated just now';
    toast('This customer changed; the page shows the new state.');
    setTimeout(() => el.classList.remove('flash'), 3000);
  }

  function productLabel(p) {
    if (p.store === 'TRIAL' || p.store === 'PROMOTIONAL') return p.productId;
    const field = { APP_STORE: 'appStoreProductId', PLAY_STORE: 'playStoreProductId', STRIPE: 'stripePriceId' }[p.store];
    const prod = (products || []).find((x) => x[field] === p.productId || x[field] === p.productId.split(':')[0]);
    return prod ? `${prod.displayName || prod.id} (${p.productId})` : p.productId;
  }

  // The promotional grant of `key` that gives access now, by the server's reading.
  function activePromo(customer, key) {
    return customer.purchases.find((p) => p.store === 'PROMOTIONAL' && p.productId === key && p.effectiveStatus === 'ACTIVE');
  }

  function renderCustomer(c) {
    lastCustomer = c;
    $('customer-title').textContent = c.id;
    const badge = $('customer-status');
    badge.textContent = c.paidStatus.toLowerCase();
    badge.className = 'badge ' + c.paidStatus.toLowerCase();

    const active = c.entitlements.filter((e) => e.isActive).map((e) => e.key);
    fill($('customer-summary'),
      active.length ? ['Entitled to ', h('strong', {}, active.join(', ')), ' now.'] : ['Not entitled to anything now.'],
      c.trialEndsAt ? ` Free trial ${new Date(c.trialEndsAt) > new Date() ? 'ends' : 'ended'} ${fmtTime(c.trialEndsAt)}.` : ' Never had a free trial.',
      ` Customer since ${fmtDate(c.createdAt)}.`);

    renderEntitlements(c);
    renderGrantForm(c);
    renderTimeline(c);
    renderPurchases(c);
    renderDevices(c);
    renderReceipts(c);
    renderEvents(c);
  }

  function renderEntitlements(c) {
    fill($('entitlements'), c.entitlements.map((e) => {
      const promo = activePromo(c, e.key);
      return h('div', { class: 'ent ' + (e.isActive ? 'on' : 'off'), 'data-entitlement': e.key, 'data-active': String(e.isActive) },
        h('div', { class: 'head' },
          h('span', { class: 'key' }, e.key),
          h('span', { class: 'badge ' + (e.isActive ? 'active' : 'inactive') }, e.isActive ? 'active' : 'inactive'),
          promo ? h('button', { type: 'button', class: 'danger', 'data-revoke': e.key, onclick: () => revoke(c.id, e.key, promo) }, 'Revoke grant…') : null),
        // The server's own sentence, from the rules that decide access.
        h('p', { class: 'reason' }, e.explanation),
        e.status ? h('div', { class: 'facts' },
          [`source: ${storeName(e.store)}`, e.productId ? `product: ${e.productId}` : null,
            e.periodType ? `period: ${e.periodType.toLowerCase()}` : null,
            `status: ${STATUS_NAMES[e.status] || e.status}`,
            `expires: ${e.expiresAt ? fmtTime(e.expiresAt) : e.isActive ? 'never' : '—'}`,
            e.isActive ? `renews: ${e.willRenew ? 'yes' : 'no'}` : null,
            e.purchaseId ? `purchase #${e.purchaseId}` : null].filter(Boolean).join(' · ')) : null);
    }));
  }

  function renderGrantForm(c) {
    const sel = $('grant-entitlement');
    const keep = sel.value;
    fill(sel, c.entitlements.map((e) => h('option', { value: e.key }, e.key)));
    if (keep && c.entitlements.some((e) => e.key === keep)) sel.value = keep;
    if (!$('grant-date').value) {
      const d = new Date(Date.now() + 30 * 86400e3);
      $('grant-date').value = fmtDate(d.toISOString());
    }
  }

  function renderPurchases(c) {
    if (!c.purchases.length) { fill($('purchases'), h('p', { class: 'empty' }, 'No purchases, trials or grants.')); return; }
    const sorted = [...c.purchases].sort((a, b) => (a.purchasedAt < b.purchasedAt ? 1 : -1));
    fill($('purchases'), h('table', { class: 'grid' },
      h('thead', {}, h('tr', {}, ['#', 'Source', 'Product', 'Status', 'Period', 'Purchased', 'Ends', 'Why'].map((t) => h('th', {}, t)))),
      h('tbody', {}, sorted.map((p) => {
        const history = c.events.filter((e) => e.purchaseId === p.id).sort((a, b) => (a.occurredAt < b.occurredAt ? -1 : 1));
        const facts = [
          ['purchased', p.purchasedAt], ['canceled', p.canceledAt], ['revoked', p.revokedAt],
          ['grace period ends', p.graceExpiresAt], ['store last updated it', p.sourceUpdatedAt],
        ].filter(([, v]) => v);
        const st = p.effectiveStatus;
        return h('tr', { 'data-purchase': p.id, 'data-status': st, 'data-store': p.store },
          h('td', {}, p.id),
          h('td', {}, storeName(p.store), p.environment === 'SANDBOX' ? h('div', { class: 'badge warn' }, 'sandbox') : null),
          h('td', {}, productLabel(p), h('div', { class: 'muted small' }, p.storePurchaseId)),
          h('td', {}, h('span', { class: 'badge ' + statusClass(st) }, STATUS_NAMES[st] || st),
            st !== p.status ? h('div', { class: 'muted small' }, `stored as ${STATUS_NAMES[p.status] || p.status}`) : null,
            p.autoRenew && p.expiresAt ? h('div', { class: 'muted small' }, 'auto-renew on') : null),
          h('td', {}, p.periodType.toLowerCase(), p.renewalCount ? h('div', { class: 'muted small' }, `${p.renewalCount} renewals`) : null),
          h('td', {}, when(p.purchasedAt)),
          h('td', {}, p.expiresAt ? when(p.expiresAt) : 'never (lifetime)'),
          // The server's own sentence, from the rules that decide access.
          h('td', { class: 'reason-text' }, p.explanation,
            h('details', {}, h('summary', {}, 'status history'),
              h('ul', {},
                facts.map(([label, v]) => h('li', {}, `${fmtTime(v)}: ${label}`)),
                history.map((e) => h('li', {}, `${fmtTime(e.occurredAt)}: ${e.entitlement} ${e.kind.toLowerCase().replace(/_/g, ' ')} (${e.oldStatus || '—'} → ${e.newStatus})`))))));
      }))));
  }

  function renderDevices(c) {
    if (!c.devices.length) { fill($('devices'), h('p', { class: 'empty' }, 'No registered devices.')); return; }
    fill($('devices'), h('table', { class: 'grid' },
      h('thead', {}, h('tr', {}, ['Platform', 'Device', 'First seen', 'Last seen', 'Trial ends'].map((t) => h('th', {}, t)))),
      h('tbody', {}, c.devices.map((d) => h('tr', {},
        h('td', {}, d.platform.toLowerCase()), h('td', {}, h('code', {}, d.deviceId)),
        h('td', {}, when(d.firstSeenAt)), h('td', {}, when(d.lastSeenAt)),
        h('td', {}, c.trialEndsAt ? when(c.trialEndsAt) : '—'))))));
  }

  function renderReceipts(c) {
    if (!c.receipts.length) { fill($('receipts'), h('p', { class: 'empty' }, 'No purchase submissions.')); return; }
    fill($('receipts'), h('table', { class: 'grid' },
      h('thead', {}, h('tr', {}, ['Received', 'Store', 'Outcome', 'Purchase'].map((t) => h('th', {}, t)))),
      h('tbody', {}, c.receipts.map((r) => h('tr', { 'data-receipt': r.id },
        h('td', {}, when(r.receivedAt)),
        h('td', {}, storeName(r.store)),
        h('td', {}, h('span', { class: 'badge ' + (r.outcome === 'valid' ? 'active' : r.outcome === 'invalid' ? 'bad' : 'warn') }, r.outcome),
          r.error ? h('div', { class: 'small' }, r.error) : null,
          h('details', {}, h('summary', {}, 'payload'), h('pre', { class: 'payload' }, JSON.stringify(r.payload, null, 2)))),
        h('td', {}, r.purchaseId ? '#' + r.purchaseId : '—'))))));
  }

  function renderEvents(c) {
    if (!c.events.length) { fill($('events'), h('p', { class: 'empty' }, 'No entitlement changes yet.')); return; }
    fill($('events'), h('table', { class: 'grid' },
      h('thead', {}, h('tr', {}, ['When', 'Entitlement', 'Change', 'From → to', 'Purchase'].map((t) => h('th', {}, t)))),
      h('tbody', {}, c.events.map((e) => h('tr', { 'data-event': e.id, 'data-kind': e.kind },
        h('td', {}, when(e.occurredAt)), h('td', {}, e.entitlement),
        h('td', {}, e.kind.toLowerCase().replace(/_/g, ' ')),
        h('td', {}, `${e.oldStatus || '—'} → ${e.newStatus}`),
        h('td', {}, e.purchaseId ? '#' + e.purchaseId : '—'))))));
  }

  // ---------- timeline ----------

  const STATUS_COLORS = {
    ACTIVE: '#2f9e5b', TRIALING: '#2a9fb5', CANCELED: '#d4a017', IN_GRACE_PERIOD: '#e8871e',
    IN_BILLING_RETRY: '#d9622b', ON_HOLD: '#c2571f', PAUSED: '#9a7fc4', EXPIRED: '#a3aab7',
    REFUNDED: '#d23a2f', REVOKED: '#8c1c3c', PENDING: '#7fa7dd',
  };

  function renderTimeline(c) {
    const el = $('timeline');
    el.className = 'timeline';
    if (!c.purchases.length) { fill(el, h('p', { class: 'empty' }, 'Nothing to draw yet.')); return; }
    const now = Date.now();
    const ps = [...c.purchases].sort((a, b) => (a.purchasedAt < b.purchasedAt ? -1 : 1));
    const t = (iso) => new Date(iso).getTime();
    let lo = Math.min(...ps.map((p) => t(p.purchasedAt)), now);
    let hi = Math.max(now, ...ps.map((p) => Math.max(p.expiresAt ? t(p.expiresAt) : 0, p.graceExpiresAt ? t(p.graceExpiresAt) : 0, p.revokedAt ? t(p.revokedAt) : 0)));
    const span = Math.max(hi - lo, 86400e3);
    lo -= span * 0.04;
    hi += span * 0.08;
    const W = 1000, left = 220, right = 20, rowH = 30, top = 26;
    const H = top + ps.length * rowH + 10;
    const x = (ms) => left + ((ms - lo) / (hi - lo)) * (W - left - right);
    const svg = h('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `Timeline of ${ps.length} purchases`, id: 'timeline-svg' });
    const defs = h('defs', {}, h('pattern', { id: 'after-revoke', width: 6, height: 6, patternUnits: 'userSpaceOnUse', patternTransform: 'rotate(45)' },
      h('rect', { width: 6, height: 6, fill: '#f3d5d2' }), h('line', { x1: 0, y1: 0, x2: 0, y2: 6, stroke: '#d23a2f', 'stroke-width': 2 })));
    svg.appendChild(defs);

    // Date ticks: about six, on day boundaries.
    const axis = h('g', { class: 'axis' });
    const step = Math.max(1, Math.round((hi - lo) / 86400e3 / 6)) * 86400e3;
    for (let ms = Math.ceil(lo / 86400e3) * 86400e3; ms <= hi; ms += step) {
      axis.appendChild(h('line', { x1: x(ms), x2: x(ms), y1: top - 6, y2: H - 6, stroke: '#eceef2' }));
      axis.appendChild(h('text', { x: x(ms), y: 14, 'text-anchor': 'middle' }, fmtDate(new Date(ms).toISOString()).slice(5)));
    }
    svg.appendChild(axis);

    ps.forEach((p, i) => {
      const y = top + i * rowH;
      const start = t(p.purchasedAt);
      const revoked = p.revokedAt ? t(p.revokedAt) : null;
      const lifetime = !p.expiresAt;
      let end = lifetime ? hi : t(p.expiresAt);
      if (p.status === 'IN_GRACE_PERIOD' && p.graceExpiresAt) end = Math.max(end, t(p.graceExpiresAt));
      const status = p.effectiveStatus;
      const color = STATUS_COLORS[status] || '#888';
      const label = `${storeName(p.store)} · ${p.store === 'TRIAL' || p.store === 'PROMOTIONAL' ? p.productId : productLabel(p).split(' (')[0]}`;
      const g = h('g', { class: 'bar', 'data-purchase': p.id, 'data-status': status });
      g.appendChild(h('title', {}, `#${p.id} ${label}: ${STATUS_NAMES[status]}; ${fmtTime(p.purchasedAt)} → ${lifetime ? 'lifetime' : fmtTime(p.expiresAt)}${p.revokedAt ? '; revoked ' + fmtTime(p.revokedAt) : ''}`));
      g.appendChild(h('text', { class: 'label', x: 8, y: y + 17 }, label.length > 34 ? label.slice(0, 33) + '…' : label));
      const solidEnd = revoked !== null ? Math.min(end, revoked) : end;
      g.appendChild(h('rect', { x: x(start), y: y + 5, width: Math.max(3, x(solidEnd) - x(start)), height: rowH - 12, rx: 4, fill: color }));
      if (revoked !== null && end > revoked) {
        // The part of the period the refund or revocation took away.
        g.appendChild(h('rect', { x: x(revoked), y: y + 5, width: Math.max(2, x(end) - x(revoked)), height: rowH - 12, rx: 4, fill: 'url(#after-revoke)', opacity: 0.9 }));
      }
      if (revoked !== null) {
        g.appendChild(h('line', { x1: x(revoked), x2: x(revoked), y1: y + 2, y2: y + rowH - 4, stroke: '#8c1c3c', 'stroke-width': 2.5 }));
      }
      if (lifetime && revoked === null) {
        g.appendChild(h('path', { d: `M ${x(end) - 2} ${y + 5} l 10 ${(rowH - 12) / 2} l -10 ${(rowH - 12) / 2} z`, fill: color }));
      }
      svg.appendChild(g);
    });
    svg.appendChild(h('line', { x1: x(now), x2: x(now), y1: top - 8, y2: H - 4, stroke: '#1d2330', 'stroke-width': 1.5, 'stroke-dasharray': '4 3' }));
    svg.appendChild(h('text', { x: x(now) + 4, y: H - 6, class: 'label' }, 'now'));

    const used = [...new Set(ps.map((p) => p.effectiveStatus))];
    const legend = h('div', { class: 'legend' },
      used.map((s) => h('span', {}, h('span', { class: 'sw st-' + s }), STATUS_NAMES[s] || s)),
      ps.some((p) => p.revokedAt) ? h('span', {}, '▮ dark tick: refunded or revoked at; hatched: the period it took away') : null,
      h('span', {}, '┆ now'));
    fill(el, svg, legend);
  }

  // ---------- actions ----------

  function confirmDialog(text) {
    return new Promise((resolve) => {
      const d = $('confirm');
      $('confirm-text').textContent = text;
      const done = () => { d.removeEventListener('close', done); resolve(d.returnValue === 'ok'); };
      d.returnValue = '';
      d.addEventListener('close', done);
      d.showModal();
      $('confirm-ok').focus();
    });
  }

  const GRANT = `mutation Grant($customerId: ID!, $entitlement: String!, $expiresAt: DateTime) {
  grantEntitlement(customerId: $customerId, entitlement: $entitlement, expiresAt: $expiresAt) { id }
}`;
  const REVOKE = `mutation Revoke($customerId: ID!, $entitlement: String!) {
  revokeGrant(customerId: $customerId, entitlement: $entitlement) { id }
}`;

  async function grant(ev) {
    ev.preventDefault();
    const id = currentCustomerId;
    const key = $('grant-entitlement').value;
    const lifetime = new FormData($('grant-form')).get('until') === 'lifetime';
    let expiresAt = null;
    if (!lifetime) {
      const day = $('grant-date').value;
      if (!day) { toast('Pick an end date, or choose lifetime.', true); return; }
      expiresAt = new Date(day + 'T23:59:59Z').toISOString();
      if (new Date(expiresAt) <= new Date()) { toast('The end date is in the past.', true); return; }
    }
    const ok = await confirmDialog(`Grant “${key}” to ${id} ${lifetime ? 'for life' : 'until the end of ' + fmtDate(expiresAt) + ' (UTC)'}?`);
    if (!ok) return;
    try {
      await gql(GRANT, { customerId: id, entitlement: key, expiresAt });
      toast(`Granted ${key} to ${id} ${lifetime ? 'for life' : 'until ' + fmtDate(expiresAt)}.`);
      await refreshCustomer(true);
    } catch (e) {
      if (!onAuthFailure(e)) toast(`Grant failed: ${e.message}`, true);
    }
  }

  async function revoke(id, key, promo) {
    const ok = await confirmDialog(`Revoke the promotional grant of “${key}” from ${id}${promo.expiresAt ? ' (it would run until ' + fmtDate(promo.expiresAt) + ')' : ' (lifetime)'}? Store purchases and the trial stay as they are.`);
    if (!ok) return;
    try {
      await gql(REVOKE, { customerId: id, entitlement: key });
      toast(`Revoked the promotional ${key} of ${id}.`);
      await refreshCustomer(true);
    } catch (e) {
      if (!onAuthFailure(e)) toast(`Revoke failed: ${e.message}`, true);
    }
  }

  // ---------- webhook log ----------

  const OUTCOME_LABELS = {
    unknown_product: 'unknown product', no_customer: 'no customer', unmatched: 'unmatched',
    failed: 'failed', unmatched_refund: 'unmatched refund', unmatched_dispute: 'unmatched dispute',
    unattributed: 'unattributed', unknown_purchase: 'unknown purchase',
  };
  const outcomeClass = (o) => (o === 'failed' ? 'bad' : OUTCOME_LABELS[o] ? 'warn' : o === 'applied' ? 'active' : '');
  const outcomeBadge = (o) => h('span', { class: 'badge ' + outcomeClass(o), 'data-outcome': o }, OUTCOME_LABELS[o] || o);

  const WEBHOOKS_QUERY = `query Webhooks($outcome: [String!], $store: Store, $replayable: Boolean, $after: String) {
  webhookEvents(outcome: $outcome, store: $store, replayable: $replayable, first: 25, after: $after) {
    pageInfo { hasNextPage endCursor }
    nodes { id store eventId type outcome customerId error receivedAt replayedAt replayable payload }
  }
}`;
  const REPLAY = `mutation Replay($id: ID!) {
  replayWebhookEvent(id: $id) { previousOutcome outcome ran event { id outcome customerId replayedAt } }
}`;

  let webhooksCursor = null;

  async function listWebhooks(more) {
    const outcome = $('webhooks-outcome').value;
    const store = $('webhooks-store').value || null;
    const vars = { store, after: more ? webhooksCursor : null };
    if (outcome === '') vars.replayable = true;
    else if (outcome !== '*') vars.outcome = [outcome];
    showError($('webhooks-error'), null);
    if (!more) fill($('webhooks'), h('p', { class: 'muted' }, 'Loading…'));
    try {
      const data = await gql(WEBHOOKS_QUERY, vars);
      const page = data.webhookEvents;
      webhooksCursor = page.pageInfo.endCursor;
      $('webhooks-more').hidden = !page.pageInfo.hasNextPage;
      renderWebhooks(page.nodes, more);
    } catch (e) {
      if (!onAuthFailure(e)) showError($('webhooks-error'), e.message);
    }
  }

  function webhookRow(w, withPayload) {
    return h('tr', { 'data-webhook': w.id, 'data-outcome': w.outcome },
      h('td', {}, when(w.receivedAt)),
      h('td', {}, storeName(w.store)),
      h('td', {}, h('code', {}, w.type || '—'), h('div', { class: 'small muted' }, w.eventId)),
      h('td', {}, outcomeBadge(w.outcome), w.error ? h('div', { class: 'small' }, w.error) : null,
        w.replayedAt ? h('div', { class: 'small muted' }, 'replayed ', when(w.replayedAt)) : null),
      h('td', {}, w.customerId ? h('a', { href: '#/customers/' + encodeURIComponent(w.customerId) }, w.customerId) : '—'),
      withPayload ? h('td', {}, h('details', {}, h('summary', {}, 'payload'), h('pre', { class: 'payload' }, JSON.stringify(w.payload, null, 2)))) : null,
      h('td', {}, w.replayable
        ? h('button', { type: 'button', class: 'ghost replay', onclick: () => replayWebhook(w) }, 'Replay…')
        : ''));
  }

  function renderWebhooks(nodes, append) {
    const el = $('webhooks');
    let tbody = el.querySelector('tbody');
    if (!append || !tbody) {
      if (!nodes.length) { fill(el, h('p', { class: 'empty' }, 'Nothing here: every delivery matched.')); return; }
      tbody = h('tbody', {});
      fill(el, h('table', { class: 'grid', id: 'webhooks-table' },
        h('thead', {}, h('tr', {}, ['Received', 'Store', 'Type', 'Outcome', 'Customer', 'Payload', ''].map((t) => h('th', {}, t)))),
        tbody));
    }
    for (const w of nodes) tbody.appendChild(webhookRow(w, true));
  }

  async function replayWebhook(w) {
    const ok = await confirmDialog(`Replay the ${storeName(w.store)} event ${w.eventId} (${OUTCOME_LABELS[w.outcome] || w.outcome})? It runs again through the same path as a new delivery; if it now matches, the customer is granted what it paid for.`);
    if (!ok) return;
    try {
      const r = (await gql(REPLAY, { id: w.id })).replayWebhookEvent;
      const now = OUTCOME_LABELS[r.outcome] || r.outcome;
      toast(r.ran ? `Replayed ${w.eventId}: ${now}.` : `${w.eventId} was not replayed: it is ${now}.`, r.outcome === 'failed');
      if (!$('webhooks-view').hidden) await listWebhooks(false);
      else await refreshCustomer(true);
    } catch (e) {
      if (!onAuthFailure(e)) toast(`Replay failed: ${e.message}`, true);
    }
  }

  // Read on their own: with the customer page's lists they would pass the
  // server's complexity limit.
  const DELIVERIES_QUERY = `query Deliveries($id: ID!) {
  customer(id: $id) {
    id
    webhookEvents(limit: 20) { id store eventId type outcome error receivedAt replayedAt replayable }
  }
}`;
  let lastDeliveries = null;

  async function refreshDeliveries(id) {
    try {
      const data = await gql(DELIVERIES_QUERY, { id });
      if (id !== currentCustomerId || !data.customer) return;
      const json = JSON.stringify(data.customer);
      if (json === lastDeliveries) return;
      lastDeliveries = json;
      renderDeliveries(data.customer);
    } catch (e) {
      if (!onAuthFailure(e)) fill($('deliveries'), h('p', { class: 'error' }, e.message));
    }
  }

  function renderDeliveries(c) {
    const ws = c.webhookEvents || [];
    if (!ws.length) { fill($('deliveries'), h('p', { class: 'empty' }, 'No store notifications touched this customer.')); return; }
    fill($('deliveries'), h('table', { class: 'grid' },
      h('thead', {}, h('tr', {}, ['Received', 'Store', 'Type', 'Outcome', 'Customer', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, ws.map((w) => webhookRow(Object.assign({ customerId: c.id }, w), false)))));
  }

  // ---------- overview ----------

  const OVERVIEW_QUERY = `query Overview {
  overview(days: 30) {
    now { customersWithAccess byStore { store customers } inTrial inGracePeriod inBillingRetry }
    days { day newTrials trialConversions renewals cancellations refunds }
  }
}`;
  const SERIES = [
    ['newTrials', 'New trials', '#2a9fb5'],
    ['trialConversions', 'Trial → paid', '#2f9e5b'],
    ['renewals', 'Renewals', '#7fa7dd'],
    ['cancellations', 'Cancellations', '#d4a017'],
    ['refunds', 'Refunds', '#d23a2f'],
  ];

  async function openOverview() {
    showError($('overview-error'), null);
    try {
      const o = (await gql(OVERVIEW_QUERY)).overview;
      renderOverview(o);
    } catch (e) {
      if (!onAuthFailure(e)) showError($('overview-error'), e.message);
    }
  }

  function tile(label, value, id, cls) {
    return h('div', { class: 'tile ' + (cls || ''), 'data-tile': id }, h('div', { class: 'value' }, String(value)), h('div', { class: 'muted small' }, label));
  }

  function renderOverview(o) {
    const n = o.now;
    fill($('overview-now'),
      tile('customers with access', n.customersWithAccess, 'access'),
      n.byStore.map((s) => tile(storeName(s.store), s.customers, 'store-' + s.store)),
      tile('in trial', n.inTrial, 'trial'),
      tile('in grace period', n.inGracePeriod, 'grace', n.inGracePeriod ? 'warn' : ''),
      tile('in billing retry', n.inBillingRetry, 'retry', n.inBillingRetry ? 'bad' : ''));
    const days = o.days;
    $('overview-range').textContent = days.length ? `${days[0].day} – ${days[days.length - 1].day} (UTC)` : '';
    const W = 1000, H = 260, left = 40, right = 10, top = 14, bottom = 30;
    const max = Math.max(1, ...days.flatMap((d) => SERIES.map(([k]) => d[k])));
    const slot = (W - left - right) / Math.max(1, days.length);
    const bw = Math.max(1, (slot - 4) / SERIES.length);
    const y = (v) => top + (H - top - bottom) * (1 - v / max);
    const svg = h('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', id: 'overview-svg', 'aria-label': `Changes per day over ${days.length} days` });
    const axis = h('g', { class: 'axis' });
    const ticks = max <= 5 ? max : 4;
    for (let i = 0; i <= ticks; i++) {
      const v = Math.round((max * i) / ticks);
      axis.appendChild(h('line', { x1: left, x2: W - right, y1: y(v), y2: y(v), stroke: '#eceef2' }));
      axis.appendChild(h('text', { x: left - 6, y: y(v) + 4, 'text-anchor': 'end' }, String(v)));
    }
    days.forEach((d, i) => {
      if (i % 5 === 0 || i === days.length - 1) {
        axis.appendChild(h('text', { x: left + slot * i + slot / 2, y: H - 10, 'text-anchor': 'middle' }, d.day.slice(5)));
      }
    });
    svg.appendChild(axis);
    days.forEach((d, i) => {
      const g = h('g', { class: 'day', 'data-day': d.day });
      g.appendChild(h('title', {}, `${d.day}: ` + SERIES.map(([k, label]) => `${label} ${d[k]}`).join(', ')));
      SERIES.forEach(([k, , color], j) => {
        if (!d[k]) return;
        g.appendChild(h('rect', {
          x: left + slot * i + 2 + bw * j, y: y(d[k]), width: bw, height: y(0) - y(d[k]), fill: color,
          'data-series': k, 'data-value': d[k],
        }));
      });
      svg.appendChild(g);
    });
    const legend = h('div', { class: 'legend' },
      SERIES.map(([k, label]) => {
        const total = days.reduce((a, d) => a + d[k], 0);
        return h('span', { 'data-series-total': k }, h('span', { class: 'sw series-' + k }), `${label} (${total})`);
      }));
    fill($('overview-chart'), svg, legend);
  }

  // ---------- wiring ----------

  document.addEventListener('DOMContentLoaded', () => {
    loadAuth();
    $('signin-form').addEventListener('submit', signIn);
    $('signout').addEventListener('click', () => { saveAuth(null); location.hash = '#/'; route(); });
    $('search-form').addEventListener('submit', (ev) => { ev.preventDefault(); goList($('search').value.trim(), null); });
    $('next-page').addEventListener('click', () => {
      if (!listState.hasNext) return;
      cursorStack.push(listState.after);
      const page = listState.page + 1;
      goList(listState.search, listState.endCursor);
      listState.page = page;
    });
    $('prev-page').addEventListener('click', () => {
      const prev = cursorStack.length ? cursorStack.pop() : null;
      const page = Math.max(1, listState.page - 1);
      goList(listState.search, prev);
      listState.page = page;
    });
    $('grant-form').addEventListener('submit', grant);
    $('webhooks-filter').addEventListener('submit', (ev) => { ev.preventDefault(); listWebhooks(false); });
    $('webhooks-more').addEventListener('click', () => listWebhooks(true));
    $('grant-date').addEventListener('input', () => { $('grant-form').querySelector('input[value=date]').checked = true; });
    window.addEventListener('hashchange', route);
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible' && currentCustomerId && !$('customer-view').hidden) refreshCustomer(false);
    });
    route();
  });
})();
