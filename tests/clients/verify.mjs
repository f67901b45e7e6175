// Verifying Entitle's signed entitlements with `jose` (npm install jose).
// Fetch the keys once while online and keep them; everything else is offline.
import { base64url, compactVerify, createLocalJWKSet, jwtVerify } from 'jose';

const ALGORITHMS = ['ES256', 'EdDSA']; // never 'none', never an HMAC

// Online, once (and again when a token names a kid you do not have).
export async function fetchKeys(baseUrl) {
  const res = await fetch(new URL('/.well-known/jwks.json', baseUrl));
  if (!res.ok) throw new Error(`JWKS: HTTP ${res.status}`);
  return res.json();
}

// Offline: the claims, if signature, issuer, audience, expiry and (when
// given) the device check out; throws otherwise.
export async function verifyToken(token, jwks, { issuer, audience, deviceId }) {
  const { payload } = await jwtVerify(token, createLocalJWKSet(jwks), {
    algorithms: ALGORITHMS,
    issuer,
    audience,
    typ: 'JWT',
    requiredClaims: ['sub', 'iat', 'exp', 'ent'],
  });
  if (deviceId !== undefined && payload.dev !== deviceId) {
    throw new Error('token was issued for another device');
  }
  return payload;
}

// Whether entitlement `key` may be used at `now` (unix seconds): neither the
// token nor the entitlement's own end may have passed.
export function isEntitled(claims, key, now = Date.now() / 1000) {
  if (!Object.hasOwn(claims.ent ?? {}, key) || now >= claims.exp) return false;
  const end = claims.ent[key];
  return end === null || now < end;
}

// A live answer: `signature` is its X-Entitle-Signature header, `body` the
// raw response bytes, `path` the request path with its query, `nonce` the
// fresh X-Entitle-Nonce this client sent. Throws unless it verifies.
export async function verifyAnswer({ nonce, path, body, signature }, jwks) {
  const [header, detached, sig] = signature.split('.');
  if (detached !== '' || !sig) throw new Error('not a detached JWS');
  const head = new TextEncoder().encode(`${nonce}\n${path}\n`);
  const payload = new Uint8Array(head.length + body.length);
  payload.set(head);
  payload.set(body, head.length);
  const jws = `${header}.${base64url.encode(payload)}.${sig}`;
  const { protectedHeader } = await compactVerify(jws, createLocalJWKSet(jwks), {
    algorithms: ALGORITHMS,
  });
  if (protectedHeader.typ !== 'entitle-answer+jws') throw new Error('not an answer signature');
}
