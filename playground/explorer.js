// GraphQL explorer: a textarea editor with completion driven by the live
// schema (introspection), example operations for every root field, and a docs
// pane. Small on purpose: it must work with no network beyond this server.
'use strict';

window.EntitleExplorer = (function () {
  const $ = (id) => document.getElementById(id);
  let api = null;        // { gql, currentCustomerId, onAuthFailure }
  let schema = null;     // { types: Map(name -> type), query, mutation, subscription }
  let examples = [];
  let started = false;

  const INTROSPECTION = `query ExplorerIntrospection {
  __schema {
    queryType { name } mutationType { name } subscriptionType { name }
    types {
      kind name description
      fields { name description args { name description type { ...T } defaultValue } type { ...T } isDeprecated }
      inputFields { name description type { ...T } defaultValue }
      enumValues { name description }
    }
  }
}
fragment T on __Type { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } }`;

  // ---------- schema helpers ----------

  function named(t) { while (t && t.ofType) t = t.ofType; return t; }
  function typeString(t) {
    if (!t) return '';
    if (t.kind === 'NON_NULL') return typeString(t.ofType) + '!';
    if (t.kind === 'LIST') return '[' + typeString(t.ofType) + ']';
    return t.name;
  }
  function typeByName(n) { return schema && schema.types.get(n); }
  function fieldOf(typeName, fieldName) {
    const t = typeByName(typeName);
    return t && t.fields ? t.fields.find((f) => f.name === fieldName) : null;
  }

  async function loadSchema() {
    const data = await api.gql(INTROSPECTION);
    const s = data.__schema;
    schema = {
      types: new Map(s.types.map((t) => [t.name, t])),
      query: s.queryType && s.queryType.name,
      mutation: s.mutationType && s.mutationType.name,
      subscription: s.subscriptionType && s.subscriptionType.name,
    };
  }

  // ---------- example operations ----------

  const CUSTOMER_FIELDS = `id
    paidStatus
    trialEndsAt
    entitlements { key isActive expiresAt willRenew store productId periodType status }`;

  // Hand-written examples; any root field without one gets a generated one,
  // so the list always covers the whole schema.
  function curated(customerId) {
    return {
      'query.me': {
        title: 'me: the signed-in customer (customer token)',
        query: `# Needs a customer bearer token: an admin key has no "me".\nquery Me {\n  me {\n    ${CUSTOMER_FIELDS}\n  }\n}\n`,
        variables: {},
      },
      'query.customer': {
        title: 'customer: one customer, with why',
        query: `query Customer($id: ID!) {\n  customer(id: $id) {\n    ${CUSTOMER_FIELDS}\n    purchases { id store productId status purchasedAt expiresAt revokedAt }\n    devices { platform deviceId firstSeenAt lastSeenAt }\n    events(limit: 10) { kind entitlement oldStatus newStatus occurredAt }\n  }\n}\n`,
        variables: { id: customerId },
      },
      'query.customers': {
        title: 'customers: search and paginate',
        query: `query Customers($search: String, $after: String) {\n  customers(first: 10, search: $search, after: $after) {\n    pageInfo { hasNextPage endCursor }\n    nodes { id paidStatus trialEndsAt }\n  }\n}\n`,
        variables: { search: customerId.slice(0, 3), after: null },
      },
      'query.products': {
        title: 'products: the catalog',
        query: `query Products {\n  products {\n    id\n    displayName\n    kind\n    entitlements\n    appStoreProductId\n    playStoreProductId\n    stripePriceId\n  }\n}\n`,
        variables: {},
      },
      'mutation.registerDevice': {
        title: 'registerDevice: first sight starts the trial',
        query: `mutation RegisterDevice($input: RegisterDeviceInput!) {\n  registerDevice(input: $input) {\n    created\n    device { platform deviceId firstSeenAt }\n    customer { id paidStatus trialEndsAt }\n  }\n}\n`,
        variables: { input: { platform: 'GARMIN', deviceId: 'explorer-watch-1' } },
      },
      'mutation.grantEntitlement': {
        title: 'grantEntitlement: promotional access (admin)',
        query: `mutation Grant($customerId: ID!, $entitlement: String!, $expiresAt: DateTime) {\n  grantEntitlement(customerId: $customerId, entitlement: $entitlement, expiresAt: $expiresAt) {\n    id\n    paidStatus\n    entitlements { key isActive expiresAt store }\n  }\n}\n`,
        variables: { customerId, entitlement: 'pro', expiresAt: new Date(Date.now() + 30 * 86400e3).toISOString().replace(/\.\d+Z$/, 'Z') },
      },
      'mutation.pairDevice': {
        title: 'pairDevice: join a watch to the signed-in account (customer token)',
        query: `# Needs a customer bearer token and the code the watch was answered.\nmutation PairDevice($code: String!) {\n  pairDevice(code: $code) {\n    id\n    paidStatus\n    devices { platform deviceId }\n    entitlements { key isActive expiresAt store }\n  }\n}\n`,
        variables: { code: 'ABCD2345' },
      },
      'mutation.mergeCustomers': {
        title: 'mergeCustomers: one customer into another (admin)',
        query: `mutation Merge($from: ID!, $into: ID!) {\n  mergeCustomers(from: $from, into: $into) {\n    id\n    paidStatus\n    entitlements { key isActive expiresAt store }\n  }\n}\n`,
        variables: { from: 'explorer-watch-1', into: customerId },
      },
      'query.webhookEvents': {
        title: 'webhookEvents: store notifications that matched nothing (admin)',
        query: `query Webhooks($outcome: [String!], $after: String) {\n  webhookEvents(outcome: $outcome, first: 10, after: $after) {\n    pageInfo { hasNextPage endCursor }\n    nodes { id store eventId type outcome customerId error receivedAt replayedAt replayable }\n  }\n}\n`,
        variables: { outcome: ['unknown_product', 'no_customer', 'unmatched', 'failed'], after: null },
      },
      'query.overview': {
        title: 'overview: now, and the last 30 days (admin)',
        query: `query Overview {\n  overview(days: 30) {\n    now { customersWithAccess byStore { store customers } inTrial inGracePeriod inBillingRetry }\n    days { day newTrials trialConversions renewals cancellations refunds }\n  }\n}\n`,
        variables: {},
      },
      'mutation.replayWebhookEvent': {
        title: 'replayWebhookEvent: run a recorded notification again (admin)',
        query: `# One that already applied changes nothing.\nmutation Replay($id: ID!) {\n  replayWebhookEvent(id: $id) {\n    previousOutcome\n    outcome\n    ran\n    event { id outcome customerId replayedAt }\n  }\n}\n`,
        variables: { id: '1' },
      },
      'mutation.revokeGrant': {
        title: 'revokeGrant: end a promotional grant (admin)',
        query: `mutation Revoke($customerId: ID!, $entitlement: String!) {\n  revokeGrant(customerId: $customerId, entitlement: $entitlement) {\n    id\n    paidStatus\n    entitlements { key isActive expiresAt store }\n  }\n}\n`,
        variables: { customerId, entitlement: 'pro' },
      },
    };
  }

  function sampleValue(t, depth) {
    if (t.kind === 'NON_NULL') return sampleValue(t.ofType, depth);
    if (t.kind === 'LIST') return [sampleValue(t.ofType, depth)];
    const n = typeByName(t.name);
    if (!n) return null;
    if (n.kind === 'ENUM') return n.enumValues[0].name;
    if (n.kind === 'INPUT_OBJECT') {
      if (depth > 3) return {};
      const out = {};
      // A @oneOf input (every field nullable) takes exactly one field.
      const oneOf = n.inputFields.every((f) => f.type.kind !== 'NON_NULL');
      for (const f of oneOf ? n.inputFields.slice(0, 1) : n.inputFields.filter((f) => f.type.kind === 'NON_NULL')) {
        out[f.name] = sampleValue(f.type, depth + 1);
      }
      return out;
    }
    return { Int: 10, Float: 1.5, Boolean: true, DateTime: new Date().toISOString().replace(/\.\d+Z$/, 'Z') }[n.name] ?? '';
  }

  function selection(typeName, depth, indent) {
    const t = typeByName(typeName);
    if (!t || !t.fields) return '';
    const lines = [];
    for (const f of t.fields) {
      const inner = named(f.type);
      const it = typeByName(inner.name);
      const required = f.args.some((a) => a.type.kind === 'NON_NULL' && a.defaultValue === null);
      if (required) continue;
      if (it && (it.kind === 'SCALAR' || it.kind === 'ENUM')) lines.push(indent + f.name);
      else if (it && it.kind === 'OBJECT' && depth < 1) {
        const sub = selection(inner.name, depth + 1, indent + '  ');
        if (sub) lines.push(`${indent}${f.name} {\n${sub}\n${indent}}`);
      }
    }
    return lines.join('\n');
  }

  function generated(kind, f) {
    const opName = f.name.charAt(0).toUpperCase() + f.name.slice(1);
    const vars = f.args.map((a) => `$${a.name}: ${typeString(a.type)}`);
    const args = f.args.map((a) => `${a.name}: $${a.name}`);
    const variables = {};
    for (const a of f.args) variables[a.name] = sampleValue(a.type, 0);
    const inner = named(f.type);
    const it = typeByName(inner.name);
    const sel = it && it.fields ? ` {\n${selection(inner.name, 0, '    ')}\n  }` : '';
    return {
      title: `${f.name}: ${(f.description || 'generated from the schema').split('\n')[0]}`,
      query: `${kind} ${opName}${vars.length ? '(' + vars.join(', ') + ')' : ''} {\n  ${f.name}${args.length ? '(' + args.join(', ') + ')' : ''}${sel}\n}\n`,
      variables,
    };
  }

  function buildExamples() {
    const customerId = api.currentCustomerId() || 'alice';
    const hand = curated(customerId);
    const list = [];
    for (const [kind, root] of [['query', schema.query], ['mutation', schema.mutation]]) {
      const t = typeByName(root);
      if (!t) continue;
      for (const f of t.fields) {
        const id = `${kind}.${f.name}`;
        list.push({ id, kind, field: f.name, ...(hand[id] || generated(kind, f)) });
      }
    }
    examples = list;
    const sel = $('examples');
    sel.replaceChildren(...list.map((e) => {
      const o = document.createElement('option');
      o.value = e.id;
      o.textContent = `${e.kind} · ${e.title}`;
      return o;
    }));
  }

  function loadExample(id) {
    const e = examples.find((x) => x.id === id);
    if (!e) return;
    $('examples').value = id;
    $('editor').value = e.query;
    $('variables').value = JSON.stringify(e.variables, null, 2);
    updateDocs();
  }

  // ---------- running ----------

  async function run() {
    const out = $('result');
    let variables = {};
    const raw = $('variables').value.trim();
    if (raw) {
      try { variables = JSON.parse(raw); } catch (e) {
        out.className = 'failed';
        out.textContent = 'Variables are not valid JSON: ' + e.message;
        return;
      }
    }
    out.className = '';
    out.textContent = 'Running…';
    const started = performance.now();
    try {
      const { status, body } = await api.gql($('editor').value, variables, { raw: true });
      const ms = Math.round(performance.now() - started);
      const failed = !body || body.error || (body.errors && body.errors.length);
      out.className = failed ? 'failed' : 'ok';
      out.dataset.status = String(status);
      out.textContent = `// HTTP ${status} in ${ms} ms\n` + JSON.stringify(body, null, 2);
    } catch (e) {
      out.className = 'failed';
      out.textContent = e.message;
    }
  }

  // ---------- completion ----------

  // Tokens before the cursor: names, punctuation and `...`; strings and
  // comments are skipped so braces inside them do not confuse the stack.
  function tokenize(src) {
    const toks = [];
    const re = /#[^\n]*|"""[\s\S]*?(?:"""|$)|"(?:[^"\\\n]|\\.)*"?|\.\.\.|[_A-Za-z][_0-9A-Za-z]*|\$[_A-Za-z][_0-9A-Za-z]*|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[{}()\[\]:=@!,|&]/g;
    let m;
    while ((m = re.exec(src))) {
      const v = m[0];
      if (v[0] === '#') continue;
      if (v[0] === '"') { toks.push({ k: 'value', v }); continue; }
      if (/^[_A-Za-z]/.test(v)) toks.push({ k: 'name', v });
      else if (v[0] === '$') toks.push({ k: 'var', v });
      else if (/^-?\d/.test(v)) toks.push({ k: 'value', v });
      else toks.push({ k: 'punct', v });
    }
    return toks;
  }

  // Where the cursor is: inside which type's selection set, or inside which
  // field's arguments.
  function contextAt(text, pos) {
    const before = text.slice(0, pos);
    const m = /[_A-Za-z][_0-9A-Za-z]*$/.exec(before);
    const prefix = m ? m[0] : '';
    const toks = tokenize(before.slice(0, before.length - prefix.length));
    const stack = [];
    let opKind = 'query';
    let lastField = null;   // field definition most recently named in a selection
    let fragmentType = null;
    let expectFragmentType = false;
    let prev = null;
    for (const tok of toks) {
      const top = stack[stack.length - 1];
      if (tok.k === 'name') {
        if (!top) {
          if (['query', 'mutation', 'subscription'].includes(tok.v)) opKind = tok.v;
          if (tok.v === 'fragment') opKind = 'fragment';
          if (prev && prev.v === 'on') fragmentType = tok.v;
        } else if (top.kind === 'sel') {
          if (expectFragmentType) { fragmentType = tok.v; expectFragmentType = false; }
          else if (prev && prev.v === '...' && tok.v === 'on') expectFragmentType = true;
          else {
            const f = fieldOf(top.type, tok.v);
            if (f) { lastField = f; fragmentType = null; }
          }
        }
      } else if (tok.k === 'punct') {
        if (tok.v === '{') {
          if (!top) {
            const root = opKind === 'fragment' ? fragmentType : schema[opKind] || schema.query;
            stack.push({ kind: 'sel', type: root });
          } else if (top.kind === 'sel') {
            const t = fragmentType || (lastField ? named(lastField.type).name : null);
            stack.push({ kind: 'sel', type: t });
            fragmentType = null;
          } else {
            stack.push({ kind: 'obj', type: top.kind === 'args' && top.lastArg ? named(top.lastArg.type).name : null, parent: top });
          }
        } else if (tok.v === '}') {
          stack.pop();
        } else if (tok.v === '(') {
          if (!top) stack.push({ kind: 'vars' });
          else if (top.kind === 'sel') stack.push({ kind: 'args', field: lastField, lastArg: null });
          else stack.push({ kind: 'paren' });
        } else if (tok.v === ')') {
          stack.pop();
        } else if (tok.v === ':' && top && top.kind === 'args' && prev && prev.k === 'name') {
          top.lastArg = top.field ? top.field.args.find((a) => a.name === prev.v) : null;
        } else if (tok.v === ':' && top && top.kind === 'obj' && prev && prev.k === 'name') {
          const it = typeByName(top.type);
          top.lastArg = it && it.inputFields ? it.inputFields.find((a) => a.name === prev.v) : null;
        }
      }
      prev = tok;
    }
    const top = stack[stack.length - 1];
    return { prefix, top, prev, opKind, depth: stack.length };
  }

  function suggestions(ctx) {
    const { top, prev, prefix } = ctx;
    const items = [];
    if (!top) {
      for (const k of ['query', 'mutation', 'fragment']) items.push({ label: k, detail: 'keyword' });
    } else if (top.kind === 'sel') {
      const t = typeByName(top.type);
      if (t && t.fields) {
        for (const f of t.fields) {
          const sig = f.args.length ? '(' + f.args.map((a) => `${a.name}: ${typeString(a.type)}`).join(', ') + ')' : '';
          items.push({ label: f.name, detail: typeString(f.type), doc: f.description, sig });
        }
      }
      items.push({ label: '__typename', detail: 'String!' });
    } else if (top.kind === 'args' || top.kind === 'obj') {
      const afterColon = prev && prev.v === ':';
      if (afterColon && top.lastArg) {
        const t = typeByName(named(top.lastArg.type).name);
        if (t && t.kind === 'ENUM') for (const v of t.enumValues) items.push({ label: v.name, detail: t.name, doc: v.description });
        if (t && t.name === 'Boolean') for (const v of ['true', 'false']) items.push({ label: v, detail: 'Boolean' });
      } else {
        const defs = top.kind === 'args'
          ? (top.field ? top.field.args : [])
          : ((typeByName(top.type) || {}).inputFields || []);
        for (const a of defs) items.push({ label: a.name, detail: typeString(a.type), doc: a.description, insert: a.name + ': ' });
      }
    }
    const p = prefix.toLowerCase();
    return items.filter((i) => i.label.toLowerCase().startsWith(p) && i.label !== prefix)
      .concat(items.filter((i) => p && !i.label.toLowerCase().startsWith(p) && i.label.toLowerCase().includes(p)));
  }

  let open = [];
  let selected = 0;
  let currentPrefix = '';

  function caretCoords(ta, pos) {
    // A mirror element laid out like the textarea gives the caret's pixel position.
    const div = document.createElement('div');
    const cs = getComputedStyle(ta);
    for (const p of ['fontFamily', 'fontSize', 'lineHeight', 'paddingTop', 'paddingLeft', 'paddingRight', 'borderTopWidth', 'borderLeftWidth', 'letterSpacing', 'tabSize', 'whiteSpace']) div.style[p] = cs[p];
    div.style.position = 'absolute';
    div.style.visibility = 'hidden';
    div.style.width = ta.clientWidth + 'px';
    div.style.whiteSpace = 'pre';
    div.textContent = ta.value.slice(0, pos);
    const span = document.createElement('span');
    span.textContent = '\u200b';
    div.appendChild(span);
    document.body.appendChild(div);
    const top = span.offsetTop - ta.scrollTop;
    const left = span.offsetLeft - ta.scrollLeft;
    const lh = parseFloat(cs.lineHeight) || 18;
    div.remove();
    return { top: top + lh + 2, left };
  }

  function showCompletions(force) {
    if (!schema) return;
    const ta = $('editor');
    const pos = ta.selectionStart;
    if (pos !== ta.selectionEnd) return hideCompletions();
    const ctx = contextAt(ta.value, pos);
    if (!force && !ctx.prefix) return hideCompletions();
    open = suggestions(ctx).slice(0, 60);
    currentPrefix = ctx.prefix;
    if (!open.length) return hideCompletions();
    selected = 0;
    const ul = $('completions');
    ul.replaceChildren(...open.map((it, i) => {
      const li = document.createElement('li');
      li.setAttribute('role', 'option');
      li.dataset.label = it.label;
      if (i === selected) li.className = 'sel';
      const a = document.createElement('span');
      a.textContent = it.label;
      const b = document.createElement('span');
      b.className = 't';
      b.textContent = it.detail || '';
      li.append(a, b);
      if (it.doc) li.title = it.doc;
      li.addEventListener('mousedown', (ev) => { ev.preventDefault(); accept(i); });
      return li;
    }));
    const c = caretCoords(ta, pos);
    ul.style.top = Math.min(c.top, ta.clientHeight - 20) + 'px';
    ul.style.left = Math.min(c.left, Math.max(0, ta.clientWidth - 260)) + 'px';
    ul.hidden = false;
    showDoc(open[0]);
  }

  function hideCompletions() {
    $('completions').hidden = true;
    open = [];
  }

  function moveSelection(d) {
    selected = (selected + d + open.length) % open.length;
    const lis = $('completions').children;
    for (let i = 0; i < lis.length; i++) lis[i].classList.toggle('sel', i === selected);
    lis[selected].scrollIntoView({ block: 'nearest' });
    showDoc(open[selected]);
  }

  function accept(i) {
    const it = open[i];
    if (!it) return;
    const ta = $('editor');
    const pos = ta.selectionStart;
    const start = pos - currentPrefix.length;
    const text = it.insert || it.label;
    ta.setRangeText(text, start, pos, 'end');
    hideCompletions();
    ta.focus();
    updateDocs();
  }

  // ---------- docs pane ----------

  function showDoc(it) {
    if (!it || !it.doc) return;
    const d = $('docs');
    const hint = d.querySelector('.hint');
    if (hint) hint.textContent = `${it.label}${it.sig || ''}: ${it.detail || ''} — ${it.doc}`;
  }

  function updateDocs() {
    if (!schema) return;
    const ta = $('editor');
    const ctx = contextAt(ta.value, ta.selectionStart);
    let typeName = ctx.top && ctx.top.kind === 'sel' ? ctx.top.type : null;
    if (!typeName) typeName = ctx.opKind === 'mutation' ? schema.mutation : schema.query;
    const t = typeByName(typeName);
    const d = $('docs');
    const nodes = [];
    const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; };
    nodes.push(el('p', 'hint muted', 'Fields of the type at the cursor. Ctrl+Space lists what fits there.'));
    nodes.push(el('h3', null, typeName || 'Schema'));
    if (t && t.description) nodes.push(el('p', 'desc', t.description));
    for (const f of (t && t.fields) || []) {
      const div = el('div', 'field');
      const code = el('code', null, f.name + (f.args.length ? '(' + f.args.map((a) => `${a.name}: ${typeString(a.type)}`).join(', ') + ')' : ''));
      div.append(code, document.createTextNode(': '), el('span', 'type', typeString(f.type)));
      if (f.description) div.append(el('div', 'desc', f.description));
      nodes.push(div);
    }
    d.replaceChildren(...nodes);
  }

  // ---------- wiring ----------

  function wire() {
    const ta = $('editor');
    ta.addEventListener('keydown', (ev) => {
      const listOpen = !$('completions').hidden && open.length;
      if ((ev.ctrlKey || ev.metaKey) && ev.key === 'Enter') { ev.preventDefault(); hideCompletions(); run(); return; }
      if (ev.ctrlKey && (ev.key === ' ' || ev.code === 'Space')) { ev.preventDefault(); showCompletions(true); return; }
      if (listOpen) {
        if (ev.key === 'ArrowDown') { ev.preventDefault(); moveSelection(1); return; }
        if (ev.key === 'ArrowUp') { ev.preventDefault(); moveSelection(-1); return; }
        if (ev.key === 'Enter' || ev.key === 'Tab') { ev.preventDefault(); accept(selected); return; }
        if (ev.key === 'Escape') { ev.preventDefault(); hideCompletions(); return; }
      }
      if (ev.key === 'Tab') { ev.preventDefault(); ta.setRangeText('  ', ta.selectionStart, ta.selectionEnd, 'end'); }
    });
    ta.addEventListener('input', (ev) => {
      if (ev.inputType && ev.inputType.startsWith('insert')) showCompletions(false);
      else hideCompletions();
    });
    ta.addEventListener('click', () => { hideCompletions(); updateDocs(); });
    ta.addEventListener('keyup', (ev) => { if (['ArrowLeft', 'ArrowRight', 'ArrowUp', 'ArrowDown'].includes(ev.key) && $('completions').hidden) updateDocs(); });
    ta.addEventListener('blur', () => setTimeout(hideCompletions, 150));
    $('examples').addEventListener('change', (ev) => loadExample(ev.target.value));
    $('run').addEventListener('click', run);
  }

  async function openExplorer(deps) {
    api = deps;
    if (!started) { wire(); started = true; }
    const err = $('explorer-error');
    err.hidden = true;
    if (!schema) {
      try {
        await loadSchema();
      } catch (e) {
        if (api.onAuthFailure(e)) return;
        err.textContent = `The schema could not be read (${e.message}); completion is off. Is introspection disabled on this server?`;
        err.hidden = false;
        return;
      }
    }
    const keep = $('examples').value;
    buildExamples();
    if (!$('editor').value) loadExample(keep || examples[0].id);
    else $('examples').value = keep;
    updateDocs();
  }

  return { open: openExplorer, contextAt: (t, p) => contextAt(t, p), suggestions: (c) => suggestions(c) };
})();
