"""Makes what bench/passkeys.sh measures: a user with a passkey of a software
authenticator (ES256 with the `cryptography` package, "none" attestation, signature
counter 0 as synced passkeys send it, so that answers may arrive in any order), then
COUNT sign-in challenges from POST /api/v1/auth/passkey/challenge, each answered, written
one request body per line to ANSWERS_FILE.

Environment: BASE (the server, reached as http://localhost:<port>), SESSION (the user's
session token), COUNT, ANSWERS_FILE.
"""

import base64
import hashlib
import http.client
import json
import os
import urllib.parse

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

BASE = os.environ["BASE"]
ORIGIN = BASE.rstrip("/")
u = urllib.parse.urlsplit(BASE)
RP_ID = u.hostname
conn = http.client.HTTPConnection("127.0.0.1", u.port, timeout=60)


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def unb64(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def post(path, body, token=None):
    h = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        h["Authorization"] = f"Bearer {token}"
    conn.request("POST", path, body=json.dumps(body) if body is not None else "", headers=h)
    r = conn.getresponse()
    data = r.read().decode()
    if r.status not in (200, 201):
        raise SystemExit(f"{path}: {r.status} {data}")
    return json.loads(data)


def cbor_head(major, n):
    if n < 24:
        return bytes([major << 5 | n])
    if n < 256:
        return bytes([major << 5 | 24, n])
    return bytes([major << 5 | 25]) + n.to_bytes(2, "big")


def cbor_int(i):
    return cbor_head(0, i) if i >= 0 else cbor_head(1, -1 - i)


def cbor_bytes(b):
    return cbor_head(2, len(b)) + b


def cbor_text(t):
    b = t.encode()
    return cbor_head(3, len(b)) + b


key = ec.generate_private_key(ec.SECP256R1())
point = key.public_key().public_bytes(
    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
)
cred_id = os.urandom(16)
rp_hash = hashlib.sha256(RP_ID.encode()).digest()


def client_data(kind, challenge):
    return json.dumps(
        {"type": kind, "challenge": challenge, "origin": ORIGIN, "crossOrigin": False},
        separators=(",", ":"),
    ).encode()


# Registration.
c = post("/api/v1/auth/passkeys/register", None, os.environ["SESSION"])
cose = (
    cbor_head(5, 5)
    + cbor_int(1) + cbor_int(2)
    + cbor_int(3) + cbor_int(-7)
    + cbor_int(-1) + cbor_int(1)
    + cbor_int(-2) + cbor_bytes(point[1:33])
    + cbor_int(-3) + cbor_bytes(point[33:65])
)
auth_data = (
    rp_hash + bytes([0x01 | 0x04 | 0x40]) + (0).to_bytes(4, "big")
    + bytes(16) + len(cred_id).to_bytes(2, "big") + cred_id + cose
)
attestation = (
    cbor_head(5, 3)
    + cbor_text("fmt") + cbor_text("none")
    + cbor_text("attStmt") + cbor_head(5, 0)
    + cbor_text("authData") + cbor_bytes(auth_data)
)
cd = client_data("webauthn.create", c["publicKey"]["challenge"])
post(
    "/api/v1/auth/passkeys",
    {
        "ceremony": c["ceremony"],
        "name": "bench",
        "credential": {
            "id": b64(cred_id), "rawId": b64(cred_id), "type": "public-key",
            "response": {"attestationObject": b64(attestation), "clientDataJSON": b64(cd)},
            "extensions": {},
        },
    },
    os.environ["SESSION"],
)
user_handle = unb64(c["publicKey"]["user"]["id"])

# Sign-in answers, one per challenge.
get_auth_data = rp_hash + bytes([0x01 | 0x04]) + (0).to_bytes(4, "big")
with open(os.environ["ANSWERS_FILE"], "w") as out:
    for _ in range(int(os.environ["COUNT"])):
        ch = post("/api/v1/auth/passkey/challenge", {})
        cd = client_data("webauthn.get", ch["publicKey"]["challenge"])
        sig = key.sign(get_auth_data + hashlib.sha256(cd).digest(), ec.ECDSA(hashes.SHA256()))
        body = {
            "ceremony": ch["ceremony"],
            "credential": {
                "id": b64(cred_id), "rawId": b64(cred_id), "type": "public-key",
                "response": {
                    "authenticatorData": b64(get_auth_data),
                    "clientDataJSON": b64(cd),
                    "signature": b64(sig),
                    "userHandle": b64(user_handle),
                },
                "extensions": {},
            },
        }
        out.write(json.dumps(body, separators=(",", ":")) + "\n")
