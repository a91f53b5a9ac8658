"""bench/restrictions.sh's helper. Standard library only; deterministic.

MODE=seed      PATIENTS synthetic patients with OBS laboratory Observations each, every
               LABELLED-th one labelled PSY (meta.security), through POST /fhir
               transactions; the first SAMPLE patients get a patient account (invited by
               the doctor, the link read from the dev mail folder, accepted); their
               session tokens go to $DATA/patients.json (the server's temporary data
               directory, removed with it); the wrk Lua scripts go to OUTDIR.
MODE=restrict  each sampled patient restricts PSY to the doctor role (the nurse is kept
               out); MODE=unrestrict ends those restrictions.
"""

import glob
import json
import os
import random
import re
import time
import urllib.request

BASE = os.environ["BASE"]
TOKEN = os.environ["TOKEN"]
MODE = os.environ["MODE"]
DATA = os.environ["DATA"]
OUT = os.environ.get("OUTDIR", "")
PATIENTS = int(os.environ.get("PATIENTS", "0"))
OBS = int(os.environ.get("OBS", "0"))
SAMPLE = int(os.environ.get("SAMPLE", "0"))
LABELLED = int(os.environ.get("LABELLED", "10"))
PW = "Own-Record-Pass-2468!"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CAT = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                   "code": "laboratory"}]}
rng = random.Random(25)


def call(method, path, body=None, token=TOKEN, ctype="application/json"):
    req = urllib.request.Request(
        BASE + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": ctype, **({"authorization": "Bearer " + token} if token else {})})
    with urllib.request.urlopen(req, timeout=600) as r:
        text = r.read()
        return json.loads(text) if text else None


def seed():
    ids = []
    for start in range(0, PATIENTS, 20):
        entries = []
        for n in range(start, min(start + 20, PATIENTS)):
            pid = "rbench-%06d" % n
            ids.append(pid)
            entries.append({"resource": {
                "resourceType": "Patient", "id": pid,
                "name": [{"family": "Bench", "given": ["P%d" % n]}],
                "gender": "female", "birthDate": "1970-01-%02d" % (1 + n % 28),
                "telecom": [{"system": "email", "value": "%s@example.org" % pid}]},
                "request": {"method": "PUT", "url": "Patient/" + pid}})
            for k in range(OBS):
                obs = {
                    "resourceType": "Observation", "status": "final", "category": [CAT],
                    "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                    "subject": {"reference": "Patient/" + pid},
                    "effectiveDateTime": "2025-%02d-%02d" % (1 + k % 12, 1 + k % 28),
                    "valueQuantity": {"value": round(rng.uniform(9, 17), 1), "unit": "g/dL",
                                      "system": "http://unitsofmeasure.org", "code": "g/dL"}}
                if k % LABELLED == 0:
                    obs["meta"] = {"security": [{"system": ACT, "code": "PSY"}]}
                entries.append({"resource": obs, "request": {"method": "POST", "url": "Observation"}})
        call("POST", "/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": entries},
             ctype="application/fhir+json")
    sample = ids[:SAMPLE]
    tokens = {}
    for n, pid in enumerate(sample):
        # The invitation goes to the address on the record; accepting it asks the
        # birth date on the record.
        email = "%s@example.org" % pid
        call("POST", "/api/v1/patients/%s/invitation" % pid, {})
        link = None
        for _ in range(200):
            for f in sorted(glob.glob(os.path.join(DATA, "mail", "*"))):
                text = open(f, encoding="utf-8").read()
                m = re.search(r"/accounts/invite/([0-9a-f]{64})", text)
                if "To: <%s>" % email in text and m:
                    link = m.group(1)
            if link:
                break
            time.sleep(0.05)
        call("POST", "/api/v1/invitations/accept",
             {"token": link, "username": pid, "password": PW,
              "birth_date": "1970-01-%02d" % (1 + n % 28)}, token=None)
        tokens[pid] = call("POST", "/api/v1/auth/login",
                           {"username": pid, "password": PW}, token=None)["access_token"]
    with open(os.path.join(DATA, "patients.json"), "w") as f:
        json.dump(tokens, f)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "obs_page.lua"), "w") as f:
        f.write("local paths = {\n")
        for p in sample:
            f.write('  "/fhir/Observation?patient=%s&category=laboratory",\n' % p)
        f.write("}\nlocal i = 0\nrequest = function()\n  i = i %% %d + 1\n"
                "  return wrk.format(\"GET\", paths[i])\nend\n" % len(sample))


def restrictions(on):
    tokens = json.load(open(os.path.join(DATA, "patients.json")))
    for pid, tok in tokens.items():
        if on:
            call("POST", "/api/v1/me/restrictions",
                 {"category": "PSY", "roles": ["doctor"]}, token=tok)
        else:
            for r in call("GET", "/api/v1/me/restrictions", token=tok)["items"]:
                call("DELETE", "/api/v1/me/restrictions/%s" % r["id"], token=tok)


if MODE == "seed":
    seed()
elif MODE == "restrict":
    restrictions(True)
else:
    restrictions(False)
