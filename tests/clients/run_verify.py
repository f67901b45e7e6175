"""Test driver for verify.py (tests/tokens.rs): `fetch <base>` prints the
JWKS; `check` reads {jwks, issuer, audience, tokens, answers} on stdin and
prints each case's outcome, with no network."""
import base64
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import verify  # noqa: E402

if sys.argv[1] == "fetch":
    print(json.dumps(verify.fetch_keys(sys.argv[2])))
else:
    case = json.load(sys.stdin)
    out = {"tokens": {}, "answers": {}}
    for t in case["tokens"]:
        try:
            claims = verify.verify_token(
                t["token"], case["jwks"], case["issuer"], case["audience"], t.get("device")
            )
            entitled = {k: verify.is_entitled(claims, k) for k in claims["ent"]}
            out["tokens"][t["name"]] = {"ok": True, "claims": claims, "entitled": entitled}
        except Exception as e:  # the driver reports every failure as data
            out["tokens"][t["name"]] = {"ok": False, "error": type(e).__name__ + ": " + str(e)}
    for a in case["answers"]:
        try:
            body = base64.b64decode(a["body"])
            verify.verify_answer(a["nonce"], a["path"], body, a["signature"], case["jwks"])
            out["answers"][a["name"]] = {"ok": True}
        except Exception as e:
            out["answers"][a["name"]] = {"ok": False, "error": type(e).__name__ + ": " + str(e)}
    print(json.dumps(out))
