"""Verifying Entitle's signed entitlements with PyJWT (pip install PyJWT cryptography).
Fetch the keys once while online and keep them; everything else is offline."""
import base64
import json
import time
import urllib.request

import jwt

ALGORITHMS = ["ES256", "EdDSA"]  # never "none", never an HMAC


def fetch_keys(base_url):
    """Online, once (and again when a token names a kid you do not have)."""
    url = base_url.rstrip("/") + "/.well-known/jwks.json"
    with urllib.request.urlopen(url, timeout=10) as res:
        return json.load(res)


def _key(jwks, header):
    alg = header.get("alg")
    for k in jwks["keys"]:
        if alg in ALGORITHMS and k.get("kid") == header.get("kid") and k.get("alg") == alg:
            return jwt.PyJWK(k)
    raise jwt.InvalidTokenError("no published key for this kid and alg")


def verify_token(token, jwks, issuer, audience, device_id=None):
    """Offline: the claims, if signature, issuer, audience, expiry and (when
    given) the device check out; raises jwt.InvalidTokenError otherwise."""
    header = jwt.get_unverified_header(token)
    if header.get("typ") != "JWT":
        raise jwt.InvalidTokenError("not an entitlement token")
    claims = jwt.decode(
        token,
        _key(jwks, header),
        algorithms=ALGORITHMS,
        issuer=issuer,
        audience=audience,
        options={"require": ["iss", "aud", "sub", "iat", "exp", "ent"]},
    )
    if device_id is not None and claims.get("dev") != device_id:
        raise jwt.InvalidTokenError("token was issued for another device")
    return claims


def is_entitled(claims, key, now=None):
    """Whether entitlement `key` may be used at `now` (unix seconds): neither
    the token nor the entitlement's own end may have passed."""
    now = time.time() if now is None else now
    if key not in claims.get("ent", {}) or now >= claims["exp"]:
        return False
    end = claims["ent"][key]
    return end is None or now < end


def verify_answer(nonce, path, body, signature, jwks):
    """A live answer: `signature` is its X-Entitle-Signature header, `body` the
    raw response bytes, `path` the request path with its query, `nonce` the
    fresh X-Entitle-Nonce this client sent. Raises unless it verifies."""
    header_b64, detached, sig = signature.split(".")
    if detached or not sig:
        raise jwt.InvalidTokenError("not a detached JWS")
    payload = f"{nonce}\n{path}\n".encode() + body
    encoded = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    compact = f"{header_b64}.{encoded}.{sig}"
    header = jwt.get_unverified_header(compact)
    if header.get("typ") != "entitle-answer+jws":
        raise jwt.InvalidTokenError("not an answer signature")
    jwt.api_jws.decode_complete(compact, _key(jwks, header), algorithms=ALGORITHMS)
