//! The dashboard is served from the binary: the page, its scripts and styles
//! with the right content types and a policy that keeps it self-contained.

mod common;

use common::{Backend, spawn};
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playground_is_served_without_a_key() {
    let app = spawn(Backend::Sqlite).await;

    for path in ["/playground", "/playground/"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert_eq!(ct, "text/html; charset=utf-8", "{path}");
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        let body = r.text().await.unwrap();
        assert!(body.contains("<title>Entitle playground</title>"));
        assert!(body.contains("/playground/app.js"));
    }

    for (path, ct, marker) in [
        (
            "/playground/app.js",
            "text/javascript; charset=utf-8",
            "/graphql",
        ),
        (
            "/playground/explorer.js",
            "text/javascript; charset=utf-8",
            "__schema",
        ),
        (
            "/playground/app.css",
            "text/css; charset=utf-8",
            ".timeline",
        ),
    ] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()["content-type"], ct, "{path}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert!(r.text().await.unwrap().contains(marker), "{path}");
    }

    let r = app
        .client
        .get(app.url("/playground/%2e%2e%2fCargo.toml"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = app
        .client
        .get(app.url("/playground/secrets.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}
