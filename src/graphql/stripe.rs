//! Stripe Checkout and billing portal types for the web flow.

use async_graphql::{InputObject, SimpleObject};

use crate::{
    auth::Principal,
    error::AppError,
    policy::{Action, authorize},
};

#[derive(InputObject)]
pub struct CreateCheckoutSessionInput {
    /// A catalog product id (see `products`) that has a Stripe price.
    pub product_id: String,
    pub success_url: String,
    pub cancel_url: String,
}

#[derive(SimpleObject)]
pub struct CheckoutSession {
    /// The Stripe Checkout Session id (`cs_…`).
    pub id: String,
    /// Where to send the customer to pay.
    pub url: String,
}

#[derive(SimpleObject)]
pub struct PortalSession {
    /// The Stripe billing portal URL for this customer.
    pub url: String,
}

/// Checkout and the portal are for a signed-in customer, who pays for itself.
pub fn signed_in_customer(p: &Principal, action: Action) -> Result<&str, AppError> {
    authorize(p, action, None)?;
    match p {
        Principal::Customer(sub) => Ok(sub),
        _ => Err(AppError::Forbidden(action.refusal())),
    }
}
