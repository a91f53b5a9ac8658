//! The OpenAPI document and Swagger UI.

use std::collections::BTreeSet;

use crate::both_backends;
use crate::support::{Backend, TestServer, json};

/// Every route of the document is served by the router; every `/api/v1` route the
/// router serves is in the document (the two are built together by `routes::api`, and
/// this walks the document against the live server).
async fn every_documented_route_is_served(backend: Backend) {
    let s = TestServer::start(backend).await;
    let doc = json(s.get("/api/openapi.json").await).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.contains_key("/health") && paths.contains_key("/ready"));
    for (path, ops) in paths {
        let concrete = path.replace(['{', '}'], "");
        for method in ops.as_object().unwrap().keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let res = s.client.request(m, s.url(&concrete)).send().await.unwrap();
            assert_ne!(
                res.status(),
                404,
                "{method} {path} is documented but not served"
            );
            assert_ne!(
                res.status(),
                405,
                "{method} {path} is documented but not served"
            );
        }
    }
}
both_backends!(every_documented_route_is_served);

/// The document served equals the one the CLI prints and the one committed in
/// `docs/openapi.json`. Set `UPDATE_OPENAPI=1` to rewrite the committed file.
#[tokio::test]
async fn committed_openapi_matches_the_code() {
    let generated = custodian::routes::openapi_document()
        .to_pretty_json()
        .unwrap()
        + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    if std::env::var("UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is out of date: run `UPDATE_OPENAPI=1 cargo test committed_openapi` and commit it"
    );

    let s = TestServer::start(Backend::Sqlite).await;
    let served = json(s.get("/api/openapi.json").await).await;
    let generated: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert_eq!(served, generated);
}

/// Every `/api/v1` path in the document declares the bearer scheme unless the contract
/// makes it public.
#[test]
fn api_v1_routes_declare_bearer_auth() {
    let doc: serde_json::Value =
        serde_json::from_str(&custodian::routes::openapi_document().to_json().unwrap()).unwrap();
    let public: BTreeSet<&str> = [
        "/api/v1/auth/login",
        "/api/v1/auth/password",
        "/api/v1/auth/password-reset",
        "/api/v1/auth/password-reset/confirm",
        "/api/v1/auth/email/verify",
        "/api/v1/auth/register",
        "/api/v1/invitations/accept",
        "/api/v1/auth/passkey/challenge",
        "/api/v1/auth/passkey/login",
    ]
    .into();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/api/v1") || public.contains(path.as_str()) {
            continue;
        }
        for (method, op) in ops.as_object().unwrap() {
            let security = op.get("security").or(doc.get("security"));
            assert!(security.is_some(), "{method} {path} declares no security");
        }
    }
}

async fn swagger_ui_is_served_from_the_binary(backend: Backend) {
    let s = TestServer::start(backend).await;
    let res = s.get("/api/docs").await;
    assert!(res.status().is_redirection());
    let res = s.get("/api/docs/").await;
    assert_eq!(res.status(), 200);
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("style-src 'self' 'sha256-"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let html = res.text().await.unwrap();
    assert!(html.contains("swagger-ui-bundle.js"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no third-party origin in the page"
    );
    let init = s
        .get("/api/docs/swagger-initializer.js")
        .await
        .text()
        .await
        .unwrap();
    assert!(init.contains("/api/openapi.json"), "{init}");
    let bundle = s.get("/api/docs/swagger-ui-bundle.js").await;
    assert_eq!(bundle.status(), 200);
    assert!(bundle.bytes().await.unwrap().len() > 100_000);
}
both_backends!(swagger_ui_is_served_from_the_binary);

/// The image builds from what the Dockerfile copies: every top-level folder the crate
/// embeds at compile time (include_str!, askama templates) is copied before the build.
#[test]
fn the_dockerfile_copies_everything_the_build_embeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let mut needed = std::collections::BTreeSet::from(["src".to_owned(), "templates".to_owned()]);
    let mut stack = vec![root.join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for part in text.split("include_str!(").skip(1) {
                    if let Some(rest) = part.split("\"../../").nth(1) {
                        needed.insert(rest.split('/').next().unwrap().to_owned());
                    }
                }
            }
        }
    }
    assert!(
        needed.contains("migrations") && needed.contains("compliance"),
        "{needed:?}"
    );
    for dir in needed {
        assert!(
            dockerfile.contains(&format!("COPY {dir} ./{dir}")),
            "the Dockerfile does not copy {dir}/"
        );
    }
}

// ---- the project documents itself -------------------------------------------------------

fn read_doc(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

/// The lines of `text` between `<!-- tag -->` and `<!-- /tag -->`.
fn section<'a>(text: &'a str, tag: &str) -> &'a str {
    let open = format!("<!-- {tag} -->");
    let close = format!("<!-- /{tag} -->");
    let start = text.find(&open).unwrap_or_else(|| panic!("no {open}")) + open.len();
    let end = text[start..]
        .find(&close)
        .unwrap_or_else(|| panic!("no {close}"));
    &text[start..start + end]
}

/// The cells of the table rows of `text` whose first cell is a backticked value.
fn rows(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let cells: Vec<String> = l
                .trim()
                .strip_prefix('|')?
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect();
            let key = cells
                .first()?
                .strip_prefix('`')?
                .strip_suffix('`')?
                .to_owned();
            Some((key, cells[1..].to_vec()))
        })
        .collect()
}

/// What a `needs` cell of docs/api.md says: public, the permissions, session-only.
#[derive(Debug, PartialEq)]
struct Needs {
    public: bool,
    signed_in: bool,
    permissions: BTreeSet<String>,
    session_only: bool,
}

fn parse_needs(cell: &str) -> Needs {
    Needs {
        public: cell.contains("public"),
        signed_in: cell.contains("signed in") || cell.contains('`'),
        permissions: cell
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
        session_only: cell.contains("session"),
    }
}

/// docs/api.md lists exactly the operations of the OpenAPI document, each with the
/// permission the server enforces (the document's bearer scopes, which
/// `access::every_route_denies_by_default` proves), whether it is public, and whether an
/// API token is refused (the list `credentials` proves against the server).
#[test]
fn the_api_reference_lists_every_operation_as_enforced() {
    let doc: serde_json::Value =
        serde_json::from_str(&custodian::routes::openapi_document().to_json().unwrap()).unwrap();
    let api = read_doc("docs/api.md");
    let documented: std::collections::BTreeMap<String, Needs> = rows(section(&api, "operations"))
        .into_iter()
        .map(|(k, cells)| (k, parse_needs(&cells[0])))
        .collect();
    let session_only: BTreeSet<&str> = crate::credentials::SESSION_ONLY.into_iter().collect();
    let mut served = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let key = format!("{} {path}", method.to_uppercase());
            let security = op["security"].as_array().cloned().unwrap_or_default();
            let public = security.is_empty()
                || security
                    .iter()
                    .any(|r| r.as_object().is_some_and(serde_json::Map::is_empty));
            let permissions: BTreeSet<String> = security
                .iter()
                .filter_map(|r| r.get("bearer"))
                .flat_map(|s| s.as_array().cloned().unwrap_or_default())
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect();
            let signed_in = security.iter().any(|r| r.get("bearer").is_some());
            let expected = Needs {
                public,
                signed_in,
                permissions,
                session_only: session_only.contains(key.as_str()),
            };
            let Some(said) = documented.get(&key) else {
                panic!("docs/api.md does not list {key}");
            };
            assert_eq!(said, &expected, "docs/api.md, the needs of {key}");
            served.insert(key);
        }
    }
    for key in documented.keys() {
        assert!(
            served.contains(key),
            "docs/api.md lists {key}, which the server does not have"
        );
    }
}

/// Every error code the server can answer is explained in docs/api.md, and nothing else.
#[test]
fn the_api_reference_lists_every_error_code() {
    let doc: serde_json::Value =
        serde_json::from_str(&custodian::routes::openapi_document().to_json().unwrap()).unwrap();
    let codes: BTreeSet<String> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert!(codes.len() > 15, "{codes:?}");
    let api = read_doc("docs/api.md");
    let documented: BTreeSet<String> = rows(section(&api, "error-codes"))
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(documented, codes);
}

/// README and docs stand alone: no pointer outside the repository, and every relative
/// link leads to a file that exists.
#[test]
fn no_document_points_outside_the_repository() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    assert!(files.len() > 8);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.display();
        assert!(!text.contains("../shared"), "{name} points to ../shared");
        for part in text.split("](").skip(1) {
            let target = part.split(')').next().unwrap_or("");
            let target = target.split('#').next().unwrap_or("");
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let resolved = file.parent().unwrap().join(target);
            assert!(
                resolved.exists(),
                "{name} links to {target}, which is missing"
            );
        }
    }
}

/// The example of docs/smart.md is what the server answers to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_score_example_in_smart_md_is_what_the_server_answers() {
    let text = read_doc("docs/smart.md");
    let start = text.find("## The API").unwrap();
    let text = &text[start..];
    let request = text
        .split("-d '")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap();
    let request: serde_json::Value = serde_json::from_str(request).unwrap();
    let answer = text
        .split("```json")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let answer: serde_json::Value = serde_json::from_str(answer).unwrap();

    let s = TestServer::start(Backend::Sqlite).await;
    s.user("doc", "doctor", "Correct-Horse-9!").await;
    let token = s.login("doc", "Correct-Horse-9!").await;
    let res = s
        .send_as(
            reqwest::Method::POST,
            "/api/v1/precise-hbr/score",
            &token,
            Some(request),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        json(res).await,
        answer,
        "docs/smart.md shows another answer"
    );
}

/// Every bound the document states for a query parameter is the one the server keeps:
/// for each integer parameter with a `minimum`/`maximum`, the bounds themselves are
/// answered 200 and one past them 422 naming the parameter; a `maxLength` likewise.
async fn documented_query_bounds_are_the_servers(backend: Backend) {
    let s = TestServer::start_with(backend, crate::support::Options::unlimited()).await;
    let admin_id = s.user("adm", "admin", "Correct-Horse-9!").await;
    let t = s.login("adm", "Correct-Horse-9!").await;
    let p = json(
        s.post(
            "/api/v1/patients",
            Some(&t),
            serde_json::json!({"given_name": "Ada", "family_name": "Lovelace", "birth_date": "1990-01-02"}),
        )
        .await,
    )
    .await;
    let patient = p["id"].as_str().unwrap().to_owned();
    // The /api/v1/me routes are a patient account's.
    s.state
        .identity()
        .create_patient_user(
            "ada",
            None,
            &custodian::config::Secret::new("Correct-Horse-9!".into()),
            &patient,
        )
        .await
        .unwrap();
    let own = s.login("ada", "Correct-Horse-9!").await;
    let doc = json(s.get("/api/openapi.json").await).await;
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let Some(get) = ops.get("get") else { continue };
        let concrete = path
            .replace("/patients/{id}", &format!("/patients/{patient}"))
            .replace("/users/{id}", &format!("/users/{admin_id}"));
        for param in get["parameters"].as_array().into_iter().flatten() {
            if param["in"] != "query" {
                continue;
            }
            let name = param["name"].as_str().unwrap();
            let schema = &param["schema"];
            let mut cases: Vec<(String, u16)> = Vec::new();
            if let Some(min) = schema["minimum"].as_i64() {
                cases.push((min.to_string(), 200));
                cases.push(((min - 1).to_string(), 422));
            }
            if let Some(max) = schema["maximum"].as_i64() {
                cases.push((max.to_string(), 200));
                cases.push(((max + 1).to_string(), 422));
            }
            if let Some(len) = schema["maxLength"].as_u64() {
                cases.push(("a".repeat(len as usize), 200));
                cases.push(("a".repeat(len as usize + 1), 422));
            }
            for (value, want) in cases {
                let who = if path.starts_with("/api/v1/me/") {
                    &own
                } else {
                    &t
                };
                let res = s.get_as(&format!("{concrete}?{name}={value}"), who).await;
                let status = res.status().as_u16();
                let body = res.text().await.unwrap();
                assert_eq!(status, want, "GET {path}?{name}={value}: {body}");
                if want == 422 {
                    let b: serde_json::Value = serde_json::from_str(&body).unwrap();
                    assert_eq!(b["errors"][0]["field"], name, "{path}: {body}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "{checked}");
}
both_backends!(documented_query_bounds_are_the_servers);

/// The document lists the error answers every operation can give, each as the problem
/// document it is (`application/problem+json`), and links each created resource to the
/// operations on it. (The fuzz run of tests/fuzz/run.sh holds the server to it.)
#[test]
fn every_operation_documents_its_error_answers_as_problems() {
    let doc: serde_json::Value =
        serde_json::from_str(&custodian::routes::openapi_document().to_json().unwrap()).unwrap();
    let mut ops = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/api/v1/") {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            let has = |s: &str| responses.contains_key(s);
            let what = format!("{method} {path}");
            for s in ["429", "500", "503"] {
                assert!(has(s), "{what}: {s}");
            }
            if op["security"].as_array().is_some_and(|a| !a.is_empty()) {
                assert!(has("401") && has("403"), "{what}");
            }
            if path.contains('{') {
                assert!(has("404"), "{what}");
            }
            if op.get("requestBody").is_some() {
                assert!(has("413") && has("415") && has("422"), "{what}");
            }
            for (status, r) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    let content = r["content"].as_object().unwrap();
                    assert_eq!(
                        content.keys().collect::<Vec<_>>(),
                        ["application/problem+json"],
                        "{what} {status}"
                    );
                    assert_eq!(
                        content["application/problem+json"]["schema"]["$ref"],
                        "#/components/schemas/Problem"
                    );
                }
            }
            ops += 1;
        }
    }
    assert!(ops > 40, "{ops}");
    let created = &doc["paths"]["/api/v1/patients"]["post"]["responses"]["201"]["links"];
    assert_eq!(
        created["get_patient"]["parameters"]["id"], "$response.body#/id",
        "{created}"
    );
    let record =
        &doc["paths"]["/api/v1/patients/{id}/records"]["post"]["responses"]["201"]["links"];
    assert_eq!(
        record["get_record"]["operationId"], "get_record",
        "{record}"
    );
    // A score component's value is a number, a boolean or null (it said: an object).
    let value = &doc["components"]["schemas"]["Component"]["properties"]["value"]["type"];
    assert_eq!(*value, serde_json::json!(["number", "boolean", "null"]));
}
