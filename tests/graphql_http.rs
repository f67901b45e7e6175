//! GraphQL over HTTP, to the letter: the specification's reference audit
//! (the npm package graphql-http) against the real server, with no warning
//! and no error; and the two media types side by side.

mod common;

use std::{path::Path, process::Command};

use common::{Backend, spawn};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};

fn clients_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients"))
}

/// tests/clients' npm packages from its lock file, when missing.
fn install_audit() {
    if clients_dir()
        .join("node_modules/graphql-http/package.json")
        .exists()
    {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(clients_dir())
        .output()
        .expect("npm runs");
    assert!(
        out.status.success(),
        "npm ci: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_http_audit_passes_without_warnings() {
    install_audit();
    let app = spawn(Backend::Sqlite).await;
    let url = app.url("/graphql");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("graphql_http_audit.mjs")
            .arg(url)
            .current_dir(clients_dir())
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "audit failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tally = stdout.lines().last().unwrap_or_default();
    assert!(tally.ends_with(" 0 warn, 0 error"), "{stdout}");
}

async fn post(
    app: &common::TestApp,
    accept: Option<&str>,
    body: Value,
) -> (StatusCode, String, Value) {
    let mut rb = app.client.post(app.url("/graphql")).json(&body);
    if let Some(a) = accept {
        rb = rb.header(header::ACCEPT, a);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status();
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, ct, resp.json().await.unwrap_or(Value::Null))
}

const GR: &str = "application/graphql-response+json";

async fn media_types_side_by_side(b: Backend) {
    let app = spawn(b).await;
    let ok = json!({ "query": "{ __typename }" });
    let bad_parse = json!({ "query": "{" });
    let bad_field = json!({ "query": "{ noSuchField }" });
    let bad_var = json!({ "query": "query($id: ID!) { __typename }", "variables": { "id": null } });

    // Older clients: application/json, 200 with `data: null` for request errors.
    for accept in [None, Some("application/json"), Some("*/*")] {
        let (s, ct, r) = post(&app, accept, ok.clone()).await;
        assert_eq!(
            (s, ct.as_str()),
            (StatusCode::OK, "application/json"),
            "{accept:?}"
        );
        assert_eq!(r["data"]["__typename"], "QueryRoot");
        for body in [&bad_parse, &bad_field, &bad_var] {
            let (s, ct, r) = post(&app, accept, body.clone()).await;
            assert_eq!(
                (s, ct.as_str()),
                (StatusCode::OK, "application/json"),
                "{body}"
            );
            assert!(r.as_object().unwrap().contains_key("data"), "{r}");
            assert_eq!(
                r["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
                "{r}"
            );
        }
    }

    // The newer media type, alone or preferred.
    for accept in [
        GR,
        "application/graphql-response+json, application/json;q=0.9",
    ] {
        let (s, ct, r) = post(&app, Some(accept), ok.clone()).await;
        assert_eq!(s, StatusCode::OK);
        assert!(ct.starts_with(GR), "{ct}");
        assert_eq!(r["data"]["__typename"], "QueryRoot");
        for body in [&bad_parse, &bad_field, &bad_var] {
            let (s, ct, r) = post(&app, Some(accept), body.clone()).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {r}");
            assert!(ct.starts_with(GR), "{ct}");
            assert!(!r.as_object().unwrap().contains_key("data"), "{r}");
            assert_eq!(
                r["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
                "{r}"
            );
        }
        // A field error during execution is no request error: 200, with `data`.
        let (s, _, r) = post(&app, Some(accept), json!({ "query": "{ me { id } }" })).await;
        assert_eq!(s, StatusCode::OK, "{r}");
        assert!(r.as_object().unwrap().contains_key("data"), "{r}");
        assert_eq!(
            r["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
            "{r}"
        );
        // Refusals before execution answer in GraphQL's shape, with their status.
        let resp = app
            .client
            .post(app.url("/graphql"))
            .header(header::ACCEPT, accept)
            .header(header::CONTENT_TYPE, "text/plain")
            .body("{ __typename }")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let r: Value = resp.json().await.unwrap();
        assert_eq!(
            r["errors"][0]["extensions"]["code"], "UNSUPPORTED_MEDIA_TYPE",
            "{r}"
        );
    }
    // A client that prefers application/json keeps it.
    let (_, ct, _) = post(
        &app,
        Some("application/json, application/graphql-response+json;q=0.5"),
        bad_parse,
    )
    .await;
    assert_eq!(ct, "application/json");
}

on_all_backends!(media_types_side_by_side);
