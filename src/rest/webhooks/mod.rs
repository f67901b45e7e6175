//! Store webhooks. Each authenticates by the store's own signature, records
//! the event id in the same transaction as its effect, and answers 2xx only
//! once that transaction has committed.
pub mod apple;
pub mod google;
pub mod stripe;
