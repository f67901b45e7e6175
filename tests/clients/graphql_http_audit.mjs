// The GraphQL-over-HTTP specification's reference audit (graphql-http's
// `auditServer`) against a live server, run by tests/graphql_http.rs.
// Prints one line per audit that is not ok and a tally; exits non-zero on
// any warning or error.
import { auditServer } from 'graphql-http';

const url = process.argv[2];
if (!url) {
  console.error('usage: node graphql_http_audit.mjs <graphql url>');
  process.exit(2);
}
const results = await auditServer({ url });
const tally = { ok: 0, notice: 0, warn: 0, error: 0 };
for (const r of results) {
  tally[r.status] = (tally[r.status] || 0) + 1;
  if (r.status !== 'ok') {
    let body = '';
    try {
      body = r.response ? ` (${r.response.status}: ${(await r.response.text()).slice(0, 200)})` : '';
    } catch (_) { /* body already read */ }
    console.log(`${r.status.toUpperCase()} ${r.id} ${r.name}: ${r.reason}${body}`);
  }
}
console.log(`${tally.ok} ok, ${tally.notice} notice, ${tally.warn} warn, ${tally.error} error`);
process.exit(tally.warn || tally.error ? 1 : 0);
