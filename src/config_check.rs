//! `entitle config check`: the effective configuration with every secret
//! redacted, and each store section's shape checked without calling the
//! store (keys parse, key prefixes fit, URLs are well formed).

use std::sync::Arc;

use serde_json::Value;

use crate::config::{Config, JwtAlgorithm, Secret};

/// How the effective configuration is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Toml,
    Json,
}

/// The configuration as printed, and what is wrong with it.
pub struct Report {
    pub rendered: String,
    /// `section.key: what is wrong`, one per problem.
    pub problems: Vec<String>,
}

pub fn check(config: &Config, format: Format) -> anyhow::Result<Report> {
    Ok(Report {
        rendered: render(config, format)?,
        problems: problems(config),
    })
}

/// The configuration with every `Secret` replaced, and the password (and
/// credential-like query parameters) of the database and Redis URLs hidden.
pub fn redacted(config: &Config) -> anyhow::Result<Value> {
    let mut v = crate::config::redacted_value(config)?;
    for key in ["database_url", "redis_url"] {
        let secret: Option<&Secret> = match key {
            "database_url" => Some(&config.database_url),
            _ => config.redis_url.as_ref(),
        };
        if let Some(s) = secret {
            v[key] = Value::String(redact_url(s.expose()));
        }
    }
    Ok(v)
}

const HIDDEN: &str = "****";

/// `postgres://app:****@db/entitle`; a URL that does not parse is hidden whole.
fn redact_url(raw: &str) -> String {
    // `sqlite:` paths are not URLs with credentials; keep them readable.
    if raw.starts_with("sqlite:") && !raw.contains('@') {
        return raw.to_string();
    }
    let Ok(mut url) = url::Url::parse(raw) else {
        return crate::config::REDACTED.to_string();
    };
    if url.password().is_some() {
        let _ = url.set_password(Some(HIDDEN));
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let lower = k.to_ascii_lowercase();
                let secret = ["pass", "secret", "token", "key", "auth"]
                    .iter()
                    .any(|s| lower.contains(s));
                (
                    k.into_owned(),
                    if secret {
                        HIDDEN.into()
                    } else {
                        v.into_owned()
                    },
                )
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

fn render(config: &Config, format: Format) -> anyhow::Result<String> {
    let mut v = redacted(config)?;
    Ok(match format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&v)?;
            s.push('\n');
            s
        }
        Format::Toml => {
            // TOML has no null: an unset option is simply absent.
            drop_nulls(&mut v);
            toml::to_string(&v)?
        }
    })
}

fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

fn problems(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut say = |key: &str, what: String| out.push(format!("{key}: {what}"));
    // A section's own constructor parses its keys and certificates, as `serve`
    // would; it calls no store. Its message never quotes the key.
    let constructed = |r: anyhow::Result<()>| {
        r.err().map(|e| {
            format!("{e:#}")
                .trim_start_matches("invalid configuration: ")
                .to_string()
        })
    };

    if let Some(s) = &config.stripe {
        if let Some(k) = s.secret_key.as_ref().filter(|k| !k.expose().is_empty()) {
            let ok = ["sk_live_", "sk_test_", "rk_live_", "rk_test_"]
                .iter()
                .any(|p| k.expose().starts_with(p));
            if !ok {
                say(
                    "stripe.secret_key",
                    "is not a Stripe secret or restricted key (sk_live_…, sk_test_…, rk_live_…, rk_test_…)".into(),
                );
            }
        }
        if let Some(w) = s.webhook_secret.as_ref().filter(|k| !k.expose().is_empty())
            && !w.expose().starts_with("whsec_")
        {
            say(
                "stripe.webhook_secret",
                "is not a webhook signing secret (whsec_…)".into(),
            );
        }
        if s.secret_key.is_none() && s.webhook_secret.is_none() {
            say(
                "stripe",
                "neither secret_key nor webhook_secret is set: Stripe can neither be read nor heard from".into(),
            );
        }
        if let Some(link) = &s.payment_link {
            check_url(&mut say, "stripe.payment_link", link);
        }
        if let Some(e) =
            constructed(crate::providers::stripe::StripeProvider::from_config(s).map(|_| ()))
        {
            say("stripe", e);
        }
    }

    if let Some(a) = &config.apple {
        if let Some(id) = &a.issuer_id
            && !is_uuid(id)
        {
            say(
                "apple.issuer_id",
                "is not an App Store Connect issuer id (a UUID)".into(),
            );
        }
        if let Some(id) = &a.key_id
            && !(id.len() == 10 && id.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            say(
                "apple.key_id",
                "is not an App Store Connect key id (10 letters and digits)".into(),
            );
        }
        if let Some(base) = &a.api_base {
            check_url(&mut say, "apple.api_base", base);
        }
        for (i, p) in a.root_certificates.iter().enumerate() {
            if !p.is_file() {
                say(
                    &format!("apple.root_certificates[{i}]"),
                    format!("{} is not a readable file", p.display()),
                );
            }
        }
        if let Some(e) = constructed(
            crate::providers::apple::Apple::new(
                a,
                config.accept_sandbox,
                Arc::new(crate::clock::SystemClock),
            )
            .map(|_| ()),
        ) {
            say("apple", e);
        }
    }

    if let Some(g) = &config.google {
        if g.package_name.trim().is_empty() {
            say("google.package_name", "must not be empty".into());
        }
        check_url(&mut say, "google.api_base", &g.api_base);
        check_url(&mut say, "google.jwks_uri", &g.jwks_uri);
        if let Some(t) = &g.token_uri {
            check_url(&mut say, "google.token_uri", t);
        }
        if let Some(sa) = &g.service_account {
            for (key, what) in service_account_shape(sa.expose()) {
                say(&format!("google.service_account{key}"), what);
            }
        }
        if let Some(e) = constructed(crate::providers::google::GooglePlay::new(g).map(|_| ())) {
            say("google", e);
        }
    }

    if let Some(jwt) = &config.auth.jwt {
        if let Some(pem) = &jwt.public_key_pem {
            let ok = match jwt.algorithm {
                JwtAlgorithm::RS256 => {
                    jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()).is_ok()
                }
                JwtAlgorithm::ES256 => {
                    jsonwebtoken::DecodingKey::from_ec_pem(pem.as_bytes()).is_ok()
                }
                JwtAlgorithm::HS256 => true,
            };
            if !ok {
                say(
                    "auth.jwt.public_key_pem",
                    format!("is not a {:?} public key in PEM", jwt.algorithm),
                );
            }
        }
        if let Some(pem) = &jwt.private_key_pem {
            let ok = match jwt.algorithm {
                JwtAlgorithm::RS256 => {
                    jsonwebtoken::EncodingKey::from_rsa_pem(pem.expose().as_bytes()).is_ok()
                }
                JwtAlgorithm::ES256 => {
                    jsonwebtoken::EncodingKey::from_ec_pem(pem.expose().as_bytes()).is_ok()
                }
                JwtAlgorithm::HS256 => true,
            };
            if !ok {
                say(
                    "auth.jwt.private_key_pem",
                    format!("is not a {:?} private key in PEM", jwt.algorithm),
                );
            }
        }
    }
    out
}

fn check_url(say: &mut impl FnMut(&str, String), key: &str, raw: &str) {
    match url::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => {}
        _ => say(key, "is not an http(s) URL".into()),
    }
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// What is missing from a service-account key (the JSON itself or its
/// file), as `(key suffix, message)`; never quotes the key.
fn service_account_shape(json_or_path: &str) -> Vec<(String, String)> {
    let text = if json_or_path.trim_start().starts_with('{') {
        json_or_path.to_string()
    } else {
        match std::fs::read_to_string(json_or_path) {
            Ok(t) => t,
            Err(e) => return vec![(String::new(), format!("the key file cannot be read: {e}"))],
        }
    };
    let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&text) else {
        return vec![(String::new(), "is not a JSON object".into())];
    };
    let mut out = Vec::new();
    match m.get("type").and_then(Value::as_str) {
        Some("service_account") => {}
        _ => out.push((
            ".type".into(),
            "must be \"service_account\" (a key downloaded for a service account)".into(),
        )),
    }
    if !m
        .get("client_email")
        .and_then(Value::as_str)
        .is_some_and(|e| e.contains('@'))
    {
        out.push((".client_email".into(), "is missing or not an e-mail".into()));
    }
    match m.get("private_key").and_then(Value::as_str) {
        Some(k) if jsonwebtoken::EncodingKey::from_rsa_pem(k.as_bytes()).is_ok() => {}
        _ => out.push((
            ".private_key".into(),
            "is missing or not an RSA private key in PEM".into(),
        )),
    }
    if let Some(t) = m.get("token_uri").and_then(Value::as_str)
        && !url::Url::parse(t).is_ok_and(|u| u.scheme() == "https" || u.scheme() == "http")
    {
        out.push((".token_uri".into(), "is not an http(s) URL".into()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_their_shape_without_credentials() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db.internal:5432/entitle?sslmode=require"),
            "postgres://app:****@db.internal:5432/entitle?sslmode=require"
        );
        assert_eq!(
            redact_url("redis://:pw@127.0.0.1:6379/0"),
            "redis://:****@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("sqlite://entitle.db?mode=rwc"),
            "sqlite://entitle.db?mode=rwc"
        );
        assert!(
            !redact_url("postgres://db/x?password=hunter2").contains("hunter2"),
            "query credentials"
        );
    }

    #[test]
    fn uuid_shape() {
        assert!(is_uuid("57246542-96fe-1a63-e053-0824d011072a"));
        assert!(!is_uuid("57246542-96fe-1a63-e053"));
    }
}
