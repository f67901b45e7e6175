//! `POST /user`: the Garmin watch app's endpoint, wire-compatible with the
//! original backend (`paid_status` and the legacy `status`).

use std::net::SocketAddr;

use axum::{
    Extension, Json,
    extract::{ConnectInfo, Query, State},
    http::{HeaderMap, header},
};
use serde::{Deserialize, Serialize};

use super::{Caller, LimitedBody};
use crate::{
    auth::Principal,
    domain::{ExternalId, Platform},
    error::{AppError, AppResult},
    policy::{Action, authorize},
    service::customers::Rebind,
    state::AppState,
};

#[derive(Deserialize)]
pub struct IdQuery {
    id: Option<String>,
}

#[derive(Deserialize)]
struct IdBody {
    id: String,
}

#[derive(Serialize)]
pub struct UserResponse {
    paid_status: &'static str,
    status: &'static str,
    payment_link: Option<String>,
    checkout_url: Option<String>,
    trial_ends_at: Option<String>,
    /// Answered once per device; it proves possession when pairing.
    #[serde(skip_serializing_if = "Option::is_none")]
    device_secret: Option<String>,
    /// Only to a call carrying the device's secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pairing_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pairing_code_expires_at: Option<String>,
    /// Signed offline entitlements for this device.
    entitlement_token: String,
}

/// The device's secret, for a pairing code.
const DEVICE_SECRET_HEADER: &str = "x-device-secret";

pub async fn user(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Caller(principal): Caller,
    Query(query): Query<IdQuery>,
    LimitedBody(body): LimitedBody,
) -> AppResult<Json<UserResponse>> {
    // The wrong credential is refused before the body is looked at.
    authorize(&principal, Action::RegisterDevice, principal.customer_id())?;
    let raw = if body.iter().all(u8::is_ascii_whitespace) {
        query
            .id
            .ok_or_else(|| AppError::bad_input("device id missing: send {\"id\": \"…\"} or ?id="))?
    } else if is_form(&headers) {
        // Connect IQ's makeWebRequest form-encodes bodies unless told otherwise.
        url::form_urlencoded::parse(&body)
            .find(|(k, _)| k == "id")
            .map(|(_, v)| v.into_owned())
            .ok_or_else(|| AppError::bad_input("device id missing: send id=<device id>"))?
    } else {
        serde_json::from_slice::<IdBody>(&body)
            .map_err(|_| {
                AppError::bad_input("body must be JSON of the form {\"id\": \"<device id>\"}")
            })?
            .id
    };
    let id = ExternalId::parse(&raw)
        .map_err(|e| AppError::bad_input(format!("invalid device id: {e}")))?;
    // A customer token registers the watch for itself, so its answer is
    // never another customer's; a client key gets the customer the watch is
    // bound to. This route never moves a device, whoever asks.
    let customer = match &principal {
        Principal::Customer(sub) => Some(
            ExternalId::parse(sub)
                .map_err(|e| AppError::bad_input(format!("invalid customer: {e}")))?,
        ),
        _ => None,
    };
    // Only a first sighting writes (a customer, a device, a trial).
    if let Some(limiter) = &state.limiter
        && !state
            .core
            .customers()
            .device_known(Platform::Garmin, &id)
            .await?
    {
        limiter.check(
            &principal,
            limiter.client_ip(&headers, peer.as_ref().map(|p| &p.0)),
        )?;
    }
    let reg = state
        .core
        .customers()
        .register(
            Platform::Garmin,
            &id,
            customer.as_ref(),
            Rebind::Refuse,
            true,
        )
        .await?;
    let code = match headers
        .get(DEVICE_SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some(secret) => {
            state
                .core
                .pairing()
                .pairing_code(&reg.device, secret.trim())
                .await?
        }
        None => None,
    };
    let link = state
        .config
        .stripe
        .as_ref()
        .and_then(|s| s.payment_link.clone());
    let checkout_url = link.as_deref().map(|l| checkout_url(l, &reg.customer_id));
    let paid = reg.snapshot.paid_status;
    let entitlement_token = state
        .core
        .tokens()
        .entitlement_token(&reg.customer_id, Some(id.as_str()), &reg.snapshot)
        .await?;
    Ok(Json(UserResponse {
        paid_status: paid.as_str(),
        status: paid.legacy_status(),
        payment_link: link,
        checkout_url,
        trial_ends_at: reg
            .snapshot
            .trial_ends_at
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        device_secret: reg.device_secret,
        pairing_code_expires_at: code.as_ref().map(|c| {
            c.expires_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        }),
        pairing_code: code.map(|c| c.code),
        entitlement_token,
    }))
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// The payment link with `client_reference_id`, so Stripe's checkout event
/// names the device that paid.
fn checkout_url(link: &str, customer_id: &str) -> String {
    match url::Url::parse(link) {
        Ok(mut u) => {
            u.query_pairs_mut()
                .append_pair("client_reference_id", customer_id);
            u.to_string()
        }
        Err(_) => {
            let sep = if link.contains('?') { '&' } else { '?' };
            let enc: String =
                url::form_urlencoded::byte_serialize(customer_id.as_bytes()).collect();
            format!("{link}{sep}client_reference_id={enc}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::checkout_url;

    #[test]
    fn checkout_url_appends_reference() {
        assert_eq!(
            checkout_url("https://buy.stripe.com/test_123", "dev 1&x"),
            "https://buy.stripe.com/test_123?client_reference_id=dev+1%26x"
        );
        assert_eq!(
            checkout_url("https://buy.stripe.com/test_123?prefilled_email=a", "d1"),
            "https://buy.stripe.com/test_123?prefilled_email=a&client_reference_id=d1"
        );
    }
}
