use std::sync::Arc;

use async_graphql::futures_util::{Stream, StreamExt, stream};
use async_graphql::{Context, ID, Object, Subscription};
use chrono::{DateTime, Utc};
use tokio::sync::broadcast::error::RecvError;

use super::{query::principal, types::core};
use crate::{
    auth::Principal,
    error::AppError,
    events::EntitlementEvent,
    policy::{Action, authorize},
};

pub struct SubscriptionRoot;

/// One entitlement change, as published on the event stream.
pub struct EntitlementChange(Arc<EntitlementEvent>);

#[Object]
impl EntitlementChange {
    /// Deduplicate on this: a change may be delivered more than once.
    async fn event_id(&self) -> ID {
        ID(self.0.event_id.clone())
    }
    async fn customer_id(&self) -> ID {
        ID(self.0.user_id.clone())
    }
    async fn entitlement(&self) -> &str {
        &self.0.entitlement
    }
    async fn kind(&self) -> async_graphql::Result<super::types::EventKind> {
        super::types::event_kind(&self.0.kind)
    }
    /// Access level before the change, `ACTIVE` or `EXPIRED`; null if never held.
    async fn old_status(&self) -> Option<&str> {
        self.0.old_status.as_deref()
    }
    /// Access level after the change, `ACTIVE` or `EXPIRED`, whatever the cause.
    async fn new_status(&self) -> &str {
        &self.0.new_status
    }
    /// The store status behind the change (`refunded`, `billing_retry`, ...).
    async fn reason(&self) -> Option<&str> {
        self.0.reason.as_deref()
    }
    async fn occurred_at(&self) -> DateTime<Utc> {
        self.0.occurred_at
    }
}

/// Which customers' changes a principal may watch: `None` is every customer.
/// A customer token without `customerId` watches itself.
fn watch_scope(p: &Principal, customer_id: Option<&str>) -> Result<Option<String>, AppError> {
    let one = customer_id.or(match p {
        Principal::Customer(sub) => Some(sub.as_str()),
        _ => None,
    });
    match one {
        Some(c) => {
            authorize(p, Action::WatchCustomer, Some(c))?;
            Ok(Some(c.to_string()))
        }
        None => {
            authorize(p, Action::WatchAllCustomers, None)?;
            Ok(None)
        }
    }
}

#[Subscription]
impl SubscriptionRoot {
    /// Entitlement changes as they commit, on whichever replica. Customers
    /// watch themselves; client keys a customer they name; service keys and
    /// admins one customer or, without `customerId`, everyone.
    async fn entitlement_changed(
        &self,
        ctx: &Context<'_>,
        customer_id: Option<ID>,
    ) -> async_graphql::Result<impl Stream<Item = EntitlementChange> + use<>> {
        let scope = watch_scope(principal(ctx), customer_id.as_ref().map(|c| c.as_str()))?;
        let rx = core(ctx).feed().subscribe();
        let events = stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => return Some((ev, rx)),
                    Err(RecvError::Lagged(n)) => {
                        // A subscriber too slow to keep up loses events; the
                        // stream and the change log still hold them.
                        tracing::warn!(missed = n, "subscriber lagged behind the event feed");
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        });
        Ok(events.filter_map(move |ev| {
            let mine = scope.as_ref().is_none_or(|c| *c == ev.user_id);
            std::future::ready(mine.then_some(EntitlementChange(ev)))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let cust = Principal::Customer("a".into());
        assert_eq!(watch_scope(&cust, None).unwrap(), Some("a".into()));
        assert_eq!(watch_scope(&cust, Some("a")).unwrap(), Some("a".into()));
        assert_eq!(
            watch_scope(&cust, Some("b")).unwrap_err().code(),
            "FORBIDDEN"
        );
        assert_eq!(
            watch_scope(&Principal::Anonymous, None).unwrap_err().code(),
            "UNAUTHENTICATED"
        );
        let admin = Principal::AdminToken("root".into());
        assert_eq!(watch_scope(&admin, None).unwrap(), None);
        assert_eq!(watch_scope(&admin, Some("b")).unwrap(), Some("b".into()));
        let client = Principal::ApiKey {
            id: "k".into(),
            role: crate::domain::ApiKeyRole::Client,
        };
        assert_eq!(watch_scope(&client, None).unwrap_err().code(), "FORBIDDEN");
        assert_eq!(watch_scope(&client, Some("b")).unwrap(), Some("b".into()));
    }
}
