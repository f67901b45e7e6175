//! The few Play Developer API calls we make, with the access token and
//! one retry after a 401 (a token Google revoked before it expired).

use reqwest::{Method, StatusCode};
use url::Url;

use super::{GoogleError, auth::TokenSource};

pub(super) struct PlayApi {
    http: reqwest::Client,
    base: Url,
    tokens: TokenSource,
}

impl PlayApi {
    pub(super) fn new(
        http: reqwest::Client,
        base: &str,
        tokens: TokenSource,
    ) -> anyhow::Result<PlayApi> {
        let mut base = Url::parse(base)
            .map_err(|e| anyhow::anyhow!("invalid configuration: google.api_base: {e}"))?;
        if base.cannot_be_a_base() {
            anyhow::bail!("invalid configuration: google.api_base must be an http(s) URL");
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        Ok(PlayApi { http, base, tokens })
    }

    fn url(&self, package: &str, tail: &[&str], action: Option<&str>) -> Url {
        let mut url = self.base.clone();
        {
            let mut segs = url.path_segments_mut().expect("checked in new");
            segs.pop_if_empty();
            segs.extend([
                "androidpublisher",
                "v3",
                "applications",
                package,
                "purchases",
            ]);
            // Segments are percent-encoded, so a token cannot change the path.
            segs.extend(tail);
        }
        if let Some(action) = action {
            // `:acknowledge` is part of the last segment, after encoding.
            let p = format!("{}:{action}", url.path());
            url.set_path(&p);
        }
        url
    }

    pub(super) async fn get_subscription(
        &self,
        package: &str,
        token: &str,
    ) -> Result<serde_json::Value, GoogleError> {
        let url = self.url(package, &["subscriptionsv2", "tokens", token], None);
        self.call(Method::GET, url).await
    }

    pub(super) async fn get_product(
        &self,
        package: &str,
        product_id: &str,
        token: &str,
    ) -> Result<serde_json::Value, GoogleError> {
        let url = self.url(package, &["products", product_id, "tokens", token], None);
        self.call(Method::GET, url).await
    }

    /// `purchases.voidedpurchases.list` with `type=1` (subscriptions too),
    /// from `start_ms`; `page_token` continues a previous page.
    pub(super) async fn voided_purchases(
        &self,
        package: &str,
        start_ms: i64,
        page_token: Option<&str>,
    ) -> Result<serde_json::Value, GoogleError> {
        let mut url = self.url(package, &["voidedpurchases"], None);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("startTime", &start_ms.to_string());
            q.append_pair("type", "1");
            if let Some(t) = page_token {
                q.append_pair("token", t);
            }
        }
        self.call(Method::GET, url).await
    }

    pub(super) async fn acknowledge_subscription(
        &self,
        package: &str,
        product_id: &str,
        token: &str,
    ) -> Result<(), GoogleError> {
        let url = self.url(
            package,
            &["subscriptions", product_id, "tokens", token],
            Some("acknowledge"),
        );
        self.call(Method::POST, url).await.map(drop)
    }

    pub(super) async fn acknowledge_product(
        &self,
        package: &str,
        product_id: &str,
        token: &str,
    ) -> Result<(), GoogleError> {
        let url = self.url(
            package,
            &["products", product_id, "tokens", token],
            Some("acknowledge"),
        );
        self.call(Method::POST, url).await.map(drop)
    }

    async fn call(&self, method: Method, url: Url) -> Result<serde_json::Value, GoogleError> {
        let mut retried = false;
        loop {
            let token = self.tokens.token().await?;
            let mut rb = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(&token);
            if method == Method::POST {
                rb = rb.json(&serde_json::json!({}));
            }
            let resp = rb
                .send()
                .await
                .map_err(|e| GoogleError::Unavailable(format!("Play API: {e}")))?;
            let status = resp.status();
            match status {
                s if s.is_success() => {
                    let bytes = resp
                        .bytes()
                        .await
                        .map_err(|e| GoogleError::Unavailable(format!("Play API: {e}")))?;
                    if bytes.iter().all(u8::is_ascii_whitespace) {
                        return Ok(serde_json::Value::Null);
                    }
                    return serde_json::from_slice(&bytes)
                        .map_err(|e| GoogleError::Malformed(format!("Play API answer: {e}")));
                }
                StatusCode::UNAUTHORIZED if !retried => {
                    self.tokens.invalidate(&token).await;
                    retried = true;
                }
                StatusCode::NOT_FOUND | StatusCode::GONE | StatusCode::BAD_REQUEST => {
                    return Err(GoogleError::UnknownPurchase);
                }
                s => {
                    // 401 twice or 403: the service account lacks access
                    // (it can take a day to propagate); 429 and 5xx: Google's
                    // side. Either way the purchase may well be good: retry later.
                    if matches!(s, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                        tracing::error!(
                            status = %s,
                            "Play API refused our service account; check its access in the Play Console"
                        );
                    }
                    return Err(GoogleError::Unavailable(format!("Play API answered {s}")));
                }
            }
        }
    }
}
