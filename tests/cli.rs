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

#[test]
fn commands_other_than_serve_print_only_their_result() {
    let dir = tempfile::tempdir().unwrap();
    let create = |verbose: bool| {
        let mut args = vec!["api-key", "create", "--name", "ops", "--role", "admin"];
        if verbose {
            args.push("--verbose");
        }
        Command::new(env!("CARGO_BIN_EXE_entitle"))
            .args(&args)
            .current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .env_remove("RUST_LOG")
            .env(
                "ENTITLE_DATABASE_URL",
                format!("sqlite://{}?mode=rwc", dir.path().join("q.db").display()),
            )
            // The configured level is for `serve`; it must not leak into other commands.
            .env("ENTITLE_LOG", "info")
            .output()
            .unwrap()
    };
    // First run on a fresh database: it migrates, which logs at INFO when asked to.
    let out = create(false);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("ent_"), "{stdout}");
    assert!(!stderr.contains("INFO"), "{stderr}");

    let out = create(true);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
}

/// `ENTITLE_CONFIG` names the file, as the command line's `--config` does,
/// and a minimal `[auth.jwt]` (algorithm, key, issuer, audience) starts with
/// the documented defaults for the rest.
#[test]
fn entitle_config_names_the_file_and_minimal_jwt_starts() {
    use std::io::{BufRead, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let etc = tempfile::tempdir().unwrap();
    let file = etc.path().join("entitle.toml");
    std::fs::write(
        &file,
        format!(
            "bind = \"127.0.0.1:0\"\ndatabase_url = \"sqlite://{}?mode=rwc\"\n\
             [auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"{}\"\nissuer = \"iss\"\naudience = \"aud\"\n",
            dir.path().join("e.db").display(),
            "k".repeat(40)
        ),
    )
    .unwrap();
    let cmd = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_entitle"));
        c.args(args)
            .current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .env_remove("ENTITLE_DATABASE_URL")
            .env_remove("RUST_LOG")
            .env("ENTITLE_CONFIG", &file)
            .env("ENTITLE_LOG", "info");
        c
    };
    // The documented defaults: `role: admin` makes an admin.
    let out = cmd(&["token", "--sub", "alice", "--admin"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let payload = token.trim().split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["role"], "admin");

    let mut child = cmd(&["serve"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut seen = String::new();
    for _ in 0..200 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let line = strip_ansi(&line);
        seen.push_str(&line);
        if line.contains("entitle listening") {
            addr = line
                .split("addr=")
                .nth(1)
                .map(|s| s.split_whitespace().next().unwrap().to_string());
            break;
        }
    }
    let Some(addr) = addr else {
        let _ = child.kill();
        panic!("serve did not start with ENTITLE_CONFIG: {seen}");
    };
    let addr = addr.trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':');
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---- entitle config check -----------------------------------------------

fn fixture(path: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// A configuration with every kind of secret set, each to a value the
/// output can be searched for.
fn secret_config(dir: &std::path::Path, stripe_key: &str, apple_key: &str, google_sa: &str) {
    let toml = format!(
        r#"
database_url = "postgres://entitle:pg-PASSWORD-1@db.internal:5432/entitle"
redis_url = "redis://:redis-PASSWORD-2@127.0.0.1:6379/0"

[auth.jwt]
algorithm = "HS256"
secret = "jwt-SECRET-3-jwt-SECRET-3-jwt-SECRET-3"
issuer = "https://auth.test/"
audience = "entitle"

[stripe]
secret_key = {stripe_key:?}
webhook_secret = "whsec_WEBHOOK4"
payment_link = "https://buy.stripe.com/test_abc"

[apple]
bundle_id = "com.example.app"
environment = "sandbox"
issuer_id = "57246542-96fe-1a63-e053-0824d011072a"
key_id = "ABCDE12345"
private_key = {apple_key:?}

[google]
package_name = "com.example.app"
service_account = {google_sa:?}

[tokens]
encryption_key = "ZW5jcnlwdGlvbi1LRVktNS1lbmNyeXB0aW9uLUtFWS0="

[[outbound.endpoints]]
url = "https://hooks.example/entitle"
secret = "whsec_T1VUQk9VTkQtU0VDUkVULTY="
"#
    );
    std::fs::write(dir.join("entitle.toml"), toml).unwrap();
}

fn config_check(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_entitle"))
        .args(["config", "check"])
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env("ENTITLE_STRIPE__SECRET_KEY", "sk_test_FROMENV7")
        .output()
        .unwrap()
}

#[test]
fn config_check_prints_the_effective_configuration_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let apple_key = fixture("apple/testLeaf.pk8.pem");
    let rsa_key = fixture("jwt_rs256_private.pem");
    let sa = serde_json::json!({
        "type": "service_account",
        "client_email": "play@example.iam.gserviceaccount.com",
        "private_key_id": "kid",
        "private_key": rsa_key,
        "token_uri": "https://oauth2.googleapis.com/token",
    })
    .to_string();
    secret_config(dir.path(), "sk_test_INFILE", &apple_key, &sa);
    let secrets: Vec<String> = [
        "pg-PASSWORD-1",
        "redis-PASSWORD-2",
        "jwt-SECRET-3",
        "whsec_WEBHOOK4",
        "ZW5jcnlwdGlvbi1LRVktNS1lbmNyeXB0aW9uLUtFWS0",
        "T1VUQk9VTkQtU0VDUkVULTY",
        "sk_test_FROMENV7",
        "sk_test_INFILE",
    ]
    .iter()
    .map(|s| s.to_string())
    // A line from the middle of each private key.
    .chain([&apple_key, &rsa_key].map(|k| k.lines().nth(2).unwrap().to_string()))
    .collect();
    for format in ["toml", "json"] {
        let out = config_check(dir.path(), &["--format", format]);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{format}: {stderr}\n{stdout}");
        assert!(stderr.is_empty(), "quiet: {stderr}");
        for s in &secrets {
            assert!(
                !stdout.contains(s.as_str()),
                "{format} shows {s}:\n{stdout}"
            );
        }
        // The rest of the configuration is there, secrets marked as such.
        assert!(stdout.contains("<redacted>"), "{stdout}");
        assert!(stdout.contains("com.example.app"), "{stdout}");
        assert!(
            stdout.contains("postgres://entitle:****@db.internal:5432/entitle"),
            "{stdout}"
        );
        if format == "json" {
            let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(v["stripe"]["secret_key"], "<redacted>");
            assert_eq!(v["bind"], "127.0.0.1:8088", "defaults are shown too");
        } else {
            assert!(stdout.contains("[stripe]"), "{stdout}");
        }
    }
}

#[test]
fn config_check_reports_each_broken_section() {
    let dir = tempfile::tempdir().unwrap();
    secret_config(
        dir.path(),
        "unused",
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        r#"{"type": "authorized_user", "client_email": "nobody"}"#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_entitle"))
        .args(["config", "check"])
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        // A publishable key where the secret one belongs.
        .env("ENTITLE_STRIPE__SECRET_KEY", "pk_live_PUBLISHABLE8")
        .env("ENTITLE_GOOGLE__API_BASE", "not a url")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for want in [
        "problem: stripe.secret_key: is not a Stripe secret or restricted key",
        "problem: apple: apple.private_key is not a PKCS#8 EC PEM key",
        "problem: google.api_base: is not an http(s) URL",
        "problem: google.service_account.type: must be \"service_account\"",
        "problem: google.service_account.client_email",
        "problem: google.service_account.private_key",
    ] {
        assert!(stderr.contains(want), "missing `{want}` in:\n{stderr}");
    }
    assert!(
        stderr.contains("problem(s) in the configuration"),
        "{stderr}"
    );
    for s in ["pk_live_PUBLISHABLE8", "bm90IGEga2V5", "pg-PASSWORD-1"] {
        assert!(!stdout.contains(s) && !stderr.contains(s), "{s} shown");
    }
    // A configuration that does not even load says why, and fails too.
    std::fs::write(dir.path().join("entitle.toml"), "bogus_key = 1\n").unwrap();
    let out = config_check(dir.path(), &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bogus_key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
