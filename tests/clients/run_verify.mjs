// Test driver for verify.mjs (tests/tokens.rs): `fetch <base>` prints the
// JWKS; `check` reads {jwks, issuer, audience, tokens, answers} on stdin and
// prints each case's outcome, with no network.
import { fetchKeys, isEntitled, verifyAnswer, verifyToken } from './verify.mjs';

const [cmd, base] = process.argv.slice(2);
if (cmd === 'fetch') {
  process.stdout.write(JSON.stringify(await fetchKeys(base)));
} else {
  let input = '';
  for await (const chunk of process.stdin) input += chunk;
  const { jwks, issuer, audience, tokens, answers } = JSON.parse(input);
  const out = { tokens: {}, answers: {} };
  for (const t of tokens) {
    try {
      const claims = await verifyToken(t.token, jwks, { issuer, audience, deviceId: t.device ?? undefined });
      const entitled = Object.fromEntries(Object.keys(claims.ent).map((k) => [k, isEntitled(claims, k)]));
      out.tokens[t.name] = { ok: true, claims, entitled };
    } catch (e) {
      out.tokens[t.name] = { ok: false, error: String(e.code ?? e.message) };
    }
  }
  for (const a of answers) {
    try {
      await verifyAnswer({ ...a, body: Buffer.from(a.body, 'base64') }, jwks);
      out.answers[a.name] = { ok: true };
    } catch (e) {
      out.answers[a.name] = { ok: false, error: String(e.code ?? e.message) };
    }
  }
  process.stdout.write(JSON.stringify(out));
}
