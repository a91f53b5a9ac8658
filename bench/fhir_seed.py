"""Seeds synthetic patients with laboratory Observations through POST /fhir transaction
Bundles, then writes the wrk Lua scripts of bench/fhir.sh (paths cycling over SAMPLE
patients). Standard library only. Deterministic (seeded random)."""

import json
import os
import random
import urllib.request

BASE = os.environ["BASE"]
TOKEN = os.environ["TOKEN"]
PATIENTS = int(os.environ["PATIENTS"])
OBS = int(os.environ["OBS"])
PER = int(os.environ["PER_BUNDLE"])
SAMPLE = int(os.environ["SAMPLE"])
OUT = os.environ["OUTDIR"]

FAMILY = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
          "Rodriguez", "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson",
          "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White"]
GIVEN = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "John", "Radia",
         "Ken", "Margaret", "Dennis", "Lynn", "Tim", "Sophie", "Leslie"]
LABS = [("718-7", "g/dL", 9, 17), ("33914-3", "mL/min/{1.73_m2}", 20, 120),
        ("2160-0", "mg/dL", 0.5, 3), ("6690-2", "10*3/uL", 3, 12), ("777-3", "10*3/uL", 100, 400)]
CAT = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                   "code": "laboratory"}]}

rng = random.Random(21)


def post(body):
    req = urllib.request.Request(
        BASE + "/fhir", data=json.dumps(body).encode(), method="POST",
        headers={"authorization": "Bearer " + TOKEN, "content-type": "application/fhir+json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


ids = []
for start in range(0, PATIENTS, PER):
    entries = []
    for n in range(start, min(start + PER, PATIENTS)):
        pid = "bench-%06d" % n
        ids.append(pid)
        entries.append({"resource": {
            "resourceType": "Patient", "id": pid,
            "identifier": [{"system": "urn:custodian:mrn", "value": "MRN-B%06d" % n}],
            "name": [{"family": FAMILY[n % len(FAMILY)], "given": [GIVEN[n % len(GIVEN)]]}],
            "gender": "female" if n % 2 else "male",
            "birthDate": "%04d-%02d-%02d" % (1930 + n % 70, 1 + n % 12, 1 + n % 28)},
            "request": {"method": "PUT", "url": "Patient/" + pid}})
        for k in range(OBS):
            code, unit, lo, hi = LABS[k % len(LABS)]
            day = rng.randrange(0, 730)
            entries.append({"resource": {
                "resourceType": "Observation", "status": "final", "category": [CAT],
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": {"reference": "Patient/" + pid},
                "effectiveDateTime": "%04d-%02d-%02d" % (2025 - day // 365, 1 + (day // 28) % 12, 1 + day % 28),
                "valueQuantity": {"value": round(rng.uniform(lo, hi), 1), "unit": unit,
                                  "system": "http://unitsofmeasure.org", "code": unit}},
                "request": {"method": "POST", "url": "Observation"}})
    post({"resourceType": "Bundle", "type": "transaction", "entry": entries})

os.makedirs(OUT, exist_ok=True)
sample = ids[: min(SAMPLE, len(ids))]


def lua(name, paths):
    with open(os.path.join(OUT, name), "w") as f:
        f.write("local paths = {\n")
        for p in paths:
            f.write("  %s,\n" % json.dumps(p))
        f.write("}\nlocal i = 0\nrequest = function()\n  i = i %% %d + 1\n"
                "  return wrk.format(\"GET\", paths[i])\nend\n" % len(paths))


lua("health.lua", ["/health"])
lua("api_read.lua", ["/api/v1/patients/" + p for p in sample])
lua("fhir_read.lua", ["/fhir/Patient/" + p for p in sample])
lua("obs_page.lua", ["/fhir/Observation?patient=%s&category=laboratory" % p for p in sample])
lua("name.lua", ["/fhir/Patient?name=%s" % FAMILY[i % len(FAMILY)]
                 for i in range(len(sample))])
