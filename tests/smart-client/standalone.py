"""A standalone SMART launch against Custodian, driven by SMART's own Python client
library (fhirclient), with the sign-in and consent pages filled in by scripted form
posts (as a person's browser would). Run by tests/smart-client/run.sh.

Usage: standalone.py BASE ADMIN_USER ADMIN_PASSWORD DOCTOR_USER DOCTOR_PASSWORD
Exits non-zero, saying why, at the first thing that is not as it must be.
"""

import html
import json
import re
import sys
import urllib.parse

import requests
from fhirclient import client
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRPermissionDeniedException, FHIRUnauthorizedException

BASE, ADMIN, ADMIN_PW, DOCTOR, DOCTOR_PW = sys.argv[1:6]
FHIR = BASE + "/fhir"
REDIRECT = "http://127.0.0.1:9/smart-client/callback"


def check(cond, what):
    if not cond:
        print(f"smart-client: FAILED: {what}")
        sys.exit(1)
    print(f"smart-client: ok: {what}")


def api(method, path, token, body=None):
    r = requests.request(
        method,
        BASE + path,
        headers={"Authorization": f"Bearer {token}"},
        json=body,
        timeout=30,
    )
    return r


def login(user, pw):
    r = requests.post(
        BASE + "/api/v1/auth/login", json={"username": user, "password": pw}, timeout=30
    )
    r.raise_for_status()
    return r.json()["access_token"]


def hidden(page, name):
    m = re.search(r'name="%s" value="([^"]*)"' % re.escape(name), page)
    return html.unescape(m.group(1)) if m else None


# --- set-up: an app registered by the administrator, two patients with labs --------------
admin = login(ADMIN, ADMIN_PW)
doctor = login(DOCTOR, DOCTOR_PW)
r = api(
    "POST",
    "/api/v1/apps",
    admin,
    {
        "name": "fhirclient (Python)",
        "client_type": "confidential",
        "redirect_uris": [REDIRECT],
        "scopes": "launch/patient offline_access patient/Patient.rs patient/Observation.rs",
    },
)
check(r.status_code == 201, "the administrator registers a confidential app")
app = r.json()
ids = []
for given, family in [("Wilhelmina", "Fairweather"), ("Other", "Stranger")]:
    r = api("POST", "/api/v1/patients", doctor, {"given_name": given, "family_name": family, "birth_date": "1948-02-29"})
    r.raise_for_status()
    pid = r.json()["id"]
    ids.append(pid)
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2026-11-02",
        "valueQuantity": {"value": 11.2, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"},
    }
    r = requests.post(FHIR + "/Observation", headers={"Authorization": f"Bearer {doctor}", "Content-Type": "application/fhir+json"}, data=json.dumps(obs), timeout=30)
    check(r.status_code == 201, f"an Observation for {family}")
mine, other = ids

# --- the client library: discovery from the CapabilityStatement, the authorize URL -------
state = {}
smart = client.FHIRClient(
    settings={
        "app_id": app["client_id"],
        "app_secret": app["client_secret"],
        "api_base": FHIR,
        "redirect_uri": REDIRECT,
        "scope": "patient/Patient.read patient/Observation.rs offline_access",
    },
    save_func=lambda s: state.update(s),
)
check(smart.prepare() is False, "fhirclient reads the CapabilityStatement and wants authorization")
url = smart.authorize_url
check(url.startswith(BASE + "/oauth/authorize?"), f"the authorize URL comes from the server's metadata ({url[:60]}…)")
q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
check(q.get("code_challenge_method") == "S256" and q.get("aud") == FHIR, "fhirclient sends PKCE S256 and aud")

# --- a person's browser: sign in, pick the patient, consent -----------------------------
browser = requests.Session()
r = browser.get(url, allow_redirects=False, timeout=30)
m = re.search(r'http-equiv="refresh" content="0;url=([^"]+)"', r.text)
check(r.status_code == 200 and m is not None, "not signed in: a page of the server's own moves on (a same-site navigation)")
r = browser.get(BASE + html.unescape(m.group(1)), allow_redirects=False, timeout=30)
check(r.status_code == 303 and r.headers["location"].startswith("/login?next="), "then to the sign-in page")
r = browser.get(BASE + r.headers["location"], timeout=30)
csrf = hidden(r.text, "csrf")
nxt = hidden(r.text, "next")
check(nxt is not None and nxt.startswith("/oauth/authorize?"), "the sign-in page comes back to the request")
r = browser.post(BASE + "/login", data={"csrf": csrf, "username": DOCTOR, "password": DOCTOR_PW, "next": nxt}, allow_redirects=False, timeout=30)
check(r.status_code in (200, 303), "the doctor signs in with the Custodian account")
r = browser.get(url + "&picker_q=Fairweather", allow_redirects=False, timeout=30)
check(r.status_code == 200 and "Fairweather" in r.text, "the consent page's picker finds the patient")
check("Stranger" not in r.text, "the picker shows only what was searched")
scopes = [html.unescape(s) for s in re.findall(r'name="scope" value="([^"]*)"', r.text)]
check("patient/Observation.rs" in scopes, f"the scopes are offered one by one ({scopes})")
form = {
    "csrf": hidden(r.text, "csrf"),
    "request": hidden(r.text, "request"),
    "decision": "allow",
    "patient": mine,
    "offline": "yes",
    "scope": scopes,
}
r = browser.post(BASE + "/oauth/consent", data=form, allow_redirects=False, timeout=30)
check(r.status_code == 303 and r.headers["location"].startswith(REDIRECT), "consent sends the browser back to the app")
callback = r.headers["location"]

# --- the client library again: code exchange, reads -----------------------------------
smart.handle_callback(callback)
check(smart.ready, "fhirclient exchanged the code (PKCE verifier, Basic authentication)")
check(smart.patient_id == mine, "the token answer names the chosen patient")
p = smart.patient
check(p is not None and p.name[0].family == "Fairweather", "fhirclient reads the launch patient as a Patient model")
found = Observation.where(struct={"patient": mine}).perform_resources(smart.server)
check(len(found) == 1 and found[0].valueQuantity.value == 11.2, "fhirclient searches the patient's Observations")
try:
    Patient.read(other, smart.server)
    check(False, "another patient is refused")
except FHIRPermissionDeniedException as e:
    check(e.response.status_code == 403, "another patient is refused (403)")
r = requests.get(BASE + f"/api/v1/patients/{mine}", headers={"Authorization": f"Bearer {smart.server.auth.access_token}"}, timeout=30)
check(r.status_code == 401, "the app's token does not open /api/v1")

# --- refresh through the library, then revocation by the person ------------------------
old = smart.server.auth.access_token
smart.reauthorize()
check(smart.server.auth.access_token not in (None, old), "fhirclient refreshes (a rotated refresh token)")
r = api("GET", "/api/v1/auth/apps", doctor)
grants = [g for g in r.json()["items"] if g["client_id"] == app["client_id"]]
check(len(grants) == 1, "the doctor's connected apps list the grant")
api("DELETE", f"/api/v1/auth/apps/{grants[0]['id']}", doctor)
try:
    Patient.read(mine, smart.server)
    check(False, "a revoked grant is refused")
except (requests.exceptions.HTTPError, FHIRUnauthorizedException) as e:
    status = getattr(getattr(e, "response", None), "status_code", 401)
    check(status == 401, "a revoked grant is refused on the next request (401)")
print("smart-client: a standalone launch with fhirclient passed")
