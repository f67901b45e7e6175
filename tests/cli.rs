//! The `entitle` binary: migrate, API keys, tokens, schema export, config errors.

use std::process::Command;

fn entitle(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_entitle"))
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env(
            "ENTITLE_DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.join("cli.db").display()),
        )
        .env("ENTITLE_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn api_keys_are_shown_once_and_stored_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let out = entitle(dir.path(), &["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = entitle(
        dir.path(),
        &["api-key", "create", "--name", "watch", "--role", "client"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("ent_") && key.len() == 68, "{key}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains(&key[12..]),
        "the secret part is printed once, on stdout"
    );
    // The database holds the hash, never the key.
    let db = std::fs::read(dir.path().join("cli.db")).unwrap();
    let wal = std::fs::read(dir.path().join("cli.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "key stored in clear"
        );
    }
    let out = entitle(dir.path(), &["api-key", "revoke", &key[..12]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = entitle(dir.path(), &["api-key", "revoke", "key_unknown"]);
    assert!(!out.status.success());
    let out = entitle(
        dir.path(),
        &["api-key", "create", "--name", "x", "--role", "root"],
    );
    assert!(!out.status.success(), "unknown role");
}

#[test]
fn token_mints_with_the_configured_secret() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("entitle.toml"),
        "[auth.jwt]\nalgorithm = \"HS256\"\nissuer = \"iss\"\naudience = \"aud\"\nadmin_claim = \"role\"\nadmin_value = \"admin\"\nleeway_secs = 0\n",
    )
    .unwrap();
    let secret = "s".repeat(40);
    let out = Command::new(env!("CARGO_BIN_EXE_entitle"))
        .args(["token", "--sub", "alice", "--admin"])
        .current_dir(dir.path())
        .env("ENTITLE_AUTH__JWT__SECRET", &secret)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_audience(&["aud"]);
    v.set_issuer(&["iss"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &v,
    )
    .unwrap();
    assert_eq!(data.claims["sub"], "alice");
    assert_eq!(data.claims["role"], "admin");
}

#[test]
fn bad_config_stops_start_up_naming_the_key_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("entitle.toml"),
        "[http]\nrequest_timeout_secs = \"soon\"\n",
    )
    .unwrap();
    let out = entitle(dir.path(), &["migrate"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("request_timeout_secs"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_entitle"))
        .arg("migrate")
        .current_dir(dir.path())
        .env("ENTITLE_DATABASE_URL", "mysql://root:hunter2@localhost/x")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("database_url") && !err.contains("hunter2"),
        "{err}"
    );
}

#[test]
fn export_schema_writes_the_sdl() {
    let dir = tempfile::tempdir().unwrap();
    let out = entitle(dir.path(), &["export-schema", "--out", "s.graphql"]);
    assert!(out.status.success());
    let sdl = std::fs::read_to_string(dir.path().join("s.graphql")).unwrap();
    assert_eq!(sdl, entitle::graphql::sdl());
    assert!(sdl.contains("registerDevice"));
}

#[test]
fn outbound_status_lists_configured_endpoints_and_enable_refuses_unknown_ones() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    std::fs::write(
        dir.path().join("entitle.toml"),
        format!(
            "[[outbound.endpoints]]\nurl = \"https://hooks.example.com/in\"\nsecret = \"{secret}\"\n"
        ),
    )
    .unwrap();
    let out = entitle(dir.path(), &["outbound", "status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "https://hooks.example.com/in\thealthy\tpending 0\tlast success never"
    );
    assert!(!stdout.contains(&secret[6..]) && !stderr.contains(&secret[6..]));

    let out = entitle(
        dir.path(),
        &["outbound", "enable", "https://elsewhere.example.com/in"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("outbound endpoint not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
