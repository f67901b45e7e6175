//! Pure business rules: what a customer is entitled to at an instant, and
//! what changed between two such answers. No I/O, no framework types.

mod catalog;
mod engine;
mod explain;
pub mod rules;
mod token;
pub mod tokens;
mod types;
pub mod webhook_log;

pub use catalog::{Catalog, EntitlementDef, ProductDef, ProductKind, TransferPolicy, TrialPolicy};
pub use engine::{
    Access, Change, EntitlementState, PurchaseFacts, Snapshot, compute, diff, lapses,
};
pub use explain::{explain, explain_purchase};
pub use token::{TokenClaims, TokenState};
pub use types::*;
