"""Makes what bench/smart.sh measures: authorization codes through the real pages (the
doctor signed in by the sign-in form, each code one authorization request and one
consent), written one per line to CODES_FILE; a personal API token; a SMART access token
with a user/ scope and one with a patient/ scope. Secrets go only to files in the
benchmark's temporary directory (never the results).

Environment: BASE, USER, PASSWORD, SESSION (the doctor's API session token), CLIENT_ID,
VERIFIER, CODES (how many), CODES_FILE, TOKENS_FILE (JSON out), PATIENT (an id).
"""

import hashlib
import base64
import json
import os
import re
import sys
import urllib.parse

import http.client

BASE = os.environ["BASE"]
u = urllib.parse.urlsplit(BASE)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
cookies = {}


def request(method, path, body=None, headers=None):
    h = dict(headers or {})
    if cookies:
        h["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    if body is not None and not isinstance(body, (bytes, str)):
        body = urllib.parse.urlencode(body, doseq=True)
        h["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read().decode()
    for k, v in r.getheaders():
        if k.lower() == "set-cookie":
            pair = v.split(";", 1)[0]
            name, _, val = pair.partition("=")
            if val:
                cookies[name] = val
            else:
                cookies.pop(name, None)
    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data


def hidden(page, name):
    m = re.search(r'name="%s" value="([^"]*)"' % re.escape(name), page)
    return m.group(1).replace("&#x2f;", "/").replace("&amp;", "&") if m else ""


verifier = os.environ["VERIFIER"]
challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
client_id = os.environ["CLIENT_ID"]
redirect = "http://127.0.0.1:9/cb"

# Sign in through the page.
st, _, page = request("GET", "/login")
st, h, _ = request("POST", "/login", {"csrf": hidden(page, "csrf"), "username": os.environ["USER"], "password": os.environ["PASSWORD"]})
assert st == 303, st


def code(scope, patient=None):
    q = urllib.parse.urlencode({
        "response_type": "code", "client_id": client_id, "redirect_uri": redirect,
        "scope": scope, "state": "s", "aud": BASE + "/fhir",
        "code_challenge": challenge, "code_challenge_method": "S256",
    })
    st, _, page = request("GET", "/oauth/authorize?" + q)
    assert st == 200, (st, page[:300])
    scopes = [s.replace("&#x2f;", "/") for s in re.findall(r'<input type="checkbox" name="scope" value="([^"]*)"', page)]
    form = {"csrf": hidden(page, "csrf"), "request": hidden(page, "request"), "decision": "allow",
            "scope": scopes, "offline": "yes"}
    if patient:
        form["patient"] = patient
    st, h, _ = request("POST", "/oauth/consent", form)
    assert st == 303, st
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(h["location"]).query))["code"]


def exchange(c):
    st, _, body = request("POST", "/oauth/token", {
        "grant_type": "authorization_code", "code": c, "redirect_uri": redirect,
        "code_verifier": verifier, "client_id": client_id})
    assert st == 200, (st, body)
    return json.loads(body)["access_token"]


tokens = {
    "user_access": exchange(code("user/Patient.rs")),
    "patient_access": exchange(code("launch/patient patient/Patient.rs", os.environ["PATIENT"])),
}
st, _, body = request("POST", "/api/v1/tokens", json.dumps({"name": "bench", "expires_in": 86400}),
                      {"Authorization": "Bearer " + os.environ["SESSION"], "Content-Type": "application/json"})
assert st == 201, (st, body)
tokens["api_token"] = json.loads(body)["token"]
with open(os.environ["TOKENS_FILE"], "w") as f:
    json.dump(tokens, f)

n = int(os.environ["CODES"])
with open(os.environ["CODES_FILE"], "w") as f:
    for i in range(n):
        f.write(code("offline_access user/Patient.rs") + "\n")
print(f"made {n} codes", file=sys.stderr)
