//! `verifyPurchase`: one mutation for every store; the input names the store.

use async_graphql::{Context, ID, InputObject, OneofObject, SimpleObject};

use super::{
    query::principal,
    types::{Customer, Purchase, core},
};
use crate::{
    auth::Principal,
    domain::ExternalId,
    error::AppError,
    policy::{Action, authorize},
    service::{
        purchases::Applied,
        stores::{apple::AppStoreSubmission, google::PlaySubmission},
    },
};

/// A purchase to verify, from exactly one store.
#[derive(OneofObject)]
pub enum VerifyPurchaseInput {
    /// An App Store purchase (StoreKit 2 signed transaction, transaction id
    /// or legacy app receipt).
    AppStore(AppStoreInput),
    /// A Google Play Billing purchase token.
    PlayStore(PlayStoreInput),
    /// A legacy Google Play receipt (`INAPP_PURCHASE_DATA` and
    /// `INAPP_DATA_SIGNATURE`), as older billing clients and the Cordova
    /// purchase plugin send it. Checked against the app's licensing key,
    /// then read from the Play API like a token.
    PlayStoreReceipt(PlayStoreReceiptInput),
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

#[derive(InputObject)]
pub struct PlayStoreInput {
    pub package_name: String,
    /// The Play product id (for a subscription, the subscription's id).
    pub product_id: String,
    pub purchase_token: String,
}

#[derive(InputObject)]
pub struct PlayStoreReceiptInput {
    /// `INAPP_PURCHASE_DATA`: the purchase JSON exactly as the store signed it.
    pub signed_data: String,
    /// `INAPP_DATA_SIGNATURE`: base64.
    pub signature: String,
}

#[derive(SimpleObject)]
pub struct VerifyPurchasePayload {
    /// The customer the purchase now belongs to, with its entitlements.
    pub customer: Customer,
    pub purchase: Option<Purchase>,
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
    let p = principal(ctx);
    // Refuse the wrong credential before asking anything of the input.
    authorize(
        p,
        Action::VerifyPurchase,
        customer_id.as_ref().map(|c| c.as_str()),
    )?;
    // A customer token submits for itself; app keys name the customer.
    let customer_id = match (p, customer_id) {
        (_, Some(c)) => c.0,
        (Principal::Customer(sub), None) => sub.clone(),
        (_, None) => return Err(AppError::bad_input("customerId is required").into()),
    };
    let customer_id = ExternalId::parse(&customer_id)
        .map_err(|e| AppError::bad_input(format!("invalid customerId: {e}")))?;
    authorize(p, Action::VerifyPurchase, Some(customer_id.as_str()))?;
    let core = core(ctx);
    let applied: Applied = match input {
        VerifyPurchaseInput::AppStore(i) => {
            let submission = app_store_submission(i)?;
            let stores = core.stores();
            let apple = stores.apple()?;
            stores
                .verify_app_store(apple, customer_id.as_str(), submission)
                .await?
                .0
        }
        VerifyPurchaseInput::PlayStore(i) => {
            let submission = PlaySubmission::Token {
                package_name: i.package_name,
                product_id: i.product_id,
                purchase_token: i.purchase_token,
            };
            core.stores()
                .verify_play_purchase(customer_id.as_str(), submission)
                .await?
        }
        VerifyPurchaseInput::PlayStoreReceipt(i) => {
            let submission = PlaySubmission::Receipt {
                signed_data: i.signed_data,
                signature: i.signature,
            };
            core.stores()
                .verify_play_purchase(customer_id.as_str(), submission)
                .await?
        }
    };
    let model = core
        .reads()
        .find_customer(&applied.customer_id)
        .await?
        .ok_or(AppError::NotFound("customer"))?;
    let purchase = core
        .reads()
        .purchase(applied.purchase_id)
        .await?
        .map(Purchase::from_model)
        .transpose()?;
    Ok(VerifyPurchasePayload {
        customer: Customer::with_snapshot(model, applied.snapshot),
        purchase,
    })
}
