"""Validates FHIR answers captured by the integration tests with an independent model
library (fhir.resources, R4B models), plus checks Inferno makes of a server's answers.

Usage: validate.py DIR [--allow-empty]
DIR holds .json files (one resource each) and .ndjson files (one resource per line).
Prints one line per problem (file, JSON path, message; never resource contents) and a
summary; exits 1 on any problem, and when DIR holds no file unless --allow-empty.
"""

import json
import re
import sys
from pathlib import Path

from fhir.resources.R4B import get_fhir_model_class

ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
SEVERITIES = {"fatal", "error", "warning", "information"}
ISSUE_CODES = {
    "invalid", "structure", "required", "value", "invariant", "security", "login",
    "unknown", "expired", "forbidden", "suppressed", "processing", "not-supported",
    "duplicate", "multiple-matches", "not-found", "deleted", "too-long", "code-invalid",
    "extension", "too-costly", "business-rule", "conflict", "transient", "lock-error",
    "no-store", "exception", "timeout", "incomplete", "throttled", "informational",
}
SEARCH_MODES = {"match", "include", "outcome"}
REFERENCE = re.compile(r"^Patient/[A-Za-z0-9\-.]{1,64}$")

problems = []
count = 0


def problem(file, path, message):
    problems.append(f"{file}: {path}: {message}")


def check(file, path, res, in_bundle_of=None):
    """Validates one resource and, for Bundles, each entry's resource."""
    global count
    count += 1
    if not isinstance(res, dict) or "resourceType" not in res:
        problem(file, path, "not a resource (no resourceType)")
        return
    rt = res["resourceType"]
    try:
        get_fhir_model_class(rt).model_validate(res)
    except KeyError:
        problem(file, path, f"unknown resource type {rt}")
        return
    except Exception as e:  # pydantic's ValidationError; its text holds paths and kinds
        for err in getattr(e, "errors", lambda: [])() or [{"loc": (), "msg": str(e)[:200]}]:
            loc = ".".join(str(x) for x in err.get("loc", ()))
            problem(file, f"{path}.{loc}" if loc else path, err.get("msg", "invalid"))
    needs_id = rt not in ("OperationOutcome", "Bundle")
    if needs_id and not ID.match(str(res.get("id", ""))):
        problem(file, f"{path}.id", "missing or not a FHIR id")
    if "id" in res and not ID.match(str(res["id"])):
        problem(file, f"{path}.id", "not a FHIR id")
    meta = res.get("meta", {})
    if "versionId" in meta and not ID.match(str(meta["versionId"])):
        problem(file, f"{path}.meta.versionId", "not a FHIR id")
    if "lastUpdated" in meta and not INSTANT.match(str(meta["lastUpdated"])):
        problem(file, f"{path}.meta.lastUpdated", "not a FHIR instant")
    if needs_id and in_bundle_of == "searchset" and "meta" not in res:
        problem(file, f"{path}.meta", "a search result without meta.versionId")
    subject = res.get("subject")
    if isinstance(subject, dict) and "reference" in subject and not REFERENCE.match(subject["reference"]):
        problem(file, f"{path}.subject.reference", "not Patient/<id>")
    if rt == "OperationOutcome":
        issues = res.get("issue") or []
        if not issues:
            problem(file, f"{path}.issue", "an OperationOutcome without issues")
        for i, issue in enumerate(issues):
            if issue.get("severity") not in SEVERITIES:
                problem(file, f"{path}.issue[{i}].severity", "not an issue severity")
            if issue.get("code") not in ISSUE_CODES:
                problem(file, f"{path}.issue[{i}].code", "not an issue type")
    if rt == "CapabilityStatement":
        if res.get("fhirVersion") != "4.0.1":
            problem(file, f"{path}.fhirVersion", "not 4.0.1")
        if "json" not in res.get("format", []):
            problem(file, f"{path}.format", "json not listed")
        if res.get("kind") != "instance":
            problem(file, f"{path}.kind", "not instance")
        for k in ("status", "date"):
            if k not in res:
                problem(file, f"{path}.{k}", "missing")
    if rt == "Bundle":
        kind = res.get("type")
        if kind == "searchset":
            if not isinstance(res.get("total"), int) or res["total"] < 0:
                problem(file, f"{path}.total", "a searchset without a total")
            if not any(l.get("relation") == "self" for l in res.get("link", [])):
                problem(file, f"{path}.link", "a searchset without a self link")
        for i, e in enumerate(res.get("entry", [])):
            at = f"{path}.entry[{i}]"
            if "fullUrl" not in e:
                problem(file, f"{at}.fullUrl", "missing")
            if kind == "searchset" and e.get("search", {}).get("mode") not in SEARCH_MODES:
                problem(file, f"{at}.search.mode", "missing or not a search mode")
            if kind == "transaction-response" and "response" not in e:
                problem(file, f"{at}.response", "missing")
            if "resource" in e:
                inner = e["resource"]
                check(file, f"{at}.resource", inner, kind)
                rid = inner.get("id") if isinstance(inner, dict) else None
                full = e.get("fullUrl", "")
                if rid and full and not full.endswith(f"/{inner.get('resourceType')}/{rid}"):
                    problem(file, f"{at}.fullUrl", "does not name the entry's resource")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    allow_empty = "--allow-empty" in sys.argv
    if len(args) != 1:
        print(__doc__)
        return 2
    root = Path(args[0])
    files = sorted(list(root.glob("**/*.json")) + list(root.glob("**/*.ndjson"))) if root.is_dir() else []
    for f in files:
        name = f.relative_to(root)
        try:
            if f.suffix == ".ndjson":
                for n, line in enumerate(f.read_text().splitlines(), 1):
                    if line.strip():
                        check(name, f"line {n}", json.loads(line))
            else:
                check(name, "$", json.loads(f.read_text()))
        except json.JSONDecodeError:
            problem(name, "$", "not JSON")
    for p in problems:
        print(p)
    print(f"validated {count} resources in {len(files)} files, {len(problems)} failures")
    if not files and not allow_empty:
        print(f"no captured file in {root}: the capture is broken", file=sys.stderr)
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
