//! `verifyPurchase`: one input per store (`@oneOf`), one service call each.

use std::sync::Arc;

use async_graphql::{Context, ID, InputObject, OneofObject, SimpleObject};

use super::{
    query::principal,
    types::{Customer, Purchase, core},
};
use crate::{
    auth::Principal, domain::ExternalId, error::AppError, providers::apple::Apple,
    service::apple::AppStoreSubmission,
};

/// The App Store provider, absent when `[apple]` is not configured.
pub struct AppleProvider(pub Option<Arc<Apple>>);

#[derive(OneofObject)]
pub enum VerifyPurchaseInput {
    AppStore(AppStoreInput),
}

/// Exactly one of `signedTransaction`, `transactionId`, `appReceipt`.
#[derive(InputObject)]
pub struct AppStoreInput {
    /// StoreKit 2 `Transaction.jwsRepresentation`.
    pub signed_transaction: Option<String>,
    /// A transaction id, looked up with the App Store Server API.
    pub transaction_id: Option<String>,
    /// A legacy base64 app receipt; its transaction is looked up with the App Store Server API.
    pub app_receipt: Option<String>,
}

#[derive(SimpleObject)]
pub struct VerifyPurchasePayload {
    /// The customer, with entitlements as they stand after the purchase.
    pub customer: Customer,
    pub purchase: Option<Purchase>,
}

fn customer_for(p: &Principal, named: Option<&ID>) -> Result<ExternalId, AppError> {
    let id = match (p, named) {
        (_, Some(id)) => id.as_str(),
        (Principal::Customer(sub), None) => sub.as_str(),
        (Principal::Anonymous, None) => return Err(AppError::Unauthenticated),
        (_, None) => return Err(AppError::bad_input("customerId is required")),
    };
    let id = ExternalId::parse(id)
        .map_err(|e| AppError::bad_input(format!("invalid customerId: {e}")))?;
    p.require_register(Some(id.as_str()))?;
    Ok(id)
}

fn app_store_submission(input: AppStoreInput) -> Result<AppStoreSubmission, AppError> {
    match (
        input.signed_transaction,
        input.transaction_id,
        input.app_receipt,
    ) {
        (Some(s), None, None) => Ok(AppStoreSubmission::SignedTransaction(s)),
        (None, Some(t), None) => Ok(AppStoreSubmission::TransactionId(t)),
        (None, None, Some(r)) => Ok(AppStoreSubmission::AppReceipt(r)),
        _ => Err(AppError::bad_input(
            "give exactly one of signedTransaction, transactionId, appReceipt",
        )),
    }
}

pub async fn verify_purchase(
    ctx: &Context<'_>,
    input: VerifyPurchaseInput,
    customer_id: Option<ID>,
) -> async_graphql::Result<VerifyPurchasePayload> {
    let customer = customer_for(principal(ctx), customer_id.as_ref())?;
    match input {
        VerifyPurchaseInput::AppStore(input) => {
            let submission = app_store_submission(input)?;
            let apple = ctx
                .data_unchecked::<AppleProvider>()
                .0
                .as_deref()
                .ok_or(AppError::NotConfigured("App Store"))?;
            let core = core(ctx);
            let (applied, model) = core
                .verify_app_store(apple, customer.as_str(), submission)
                .await?;
            let customer_model = core
                .find_customer(&applied.customer_id)
                .await?
                .ok_or(AppError::NotFound("customer"))?;
            Ok(VerifyPurchasePayload {
                customer: Customer::with_snapshot(customer_model, applied.snapshot),
                purchase: Some(Purchase::from_model(model)?),
            })
        }
    }
}
