//! The credential policy, as data: which credential may take which action,
//! and which action guards each GraphQL field and REST route. Resolvers and
//! handlers ask [`authorize`]; nothing else decides who may do what.
//!
//! The contract is the credential matrix of the design (§6):
//!
//! | credential | may |
//! |---|---|
//! | anonymous | health, ready, playground files, JWKS, store webhooks |
//! | client key | register a device on first sight (a bound device stays bound); read the entitlement summary of the customer it names; watch it; submit a purchase for it |
//! | customer JWT | the same for itself, plus its purchases, devices and change log; Checkout and the billing portal; pair a device with its pairing code |
//! | service key | read any customer in full (purchases, devices, receipts, change log), the subscription check, watch everyone |
//! | admin | everything, including receipt payloads and store purchase ids; grants; moving a device; merging customers |
//!
//! Receipt payloads and store purchase ids (a Play purchase token is one)
//! are admin-only: whoever holds one can submit it as their own, so they
//! stay out of every credential that is shipped in apps or spread over
//! back-end services, the service key included.
//!
//! Access is checked where an object is reached (a root field, or a field
//! that yields another customer's rows) and again at every secret leaf, so
//! a path added later cannot expose a payload or a store id by accident.

use crate::{
    auth::Principal,
    domain::ApiKeyRole,
    error::{AppError, AppResult},
};

/// Who is asking, relative to the customer the action touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Credential {
    Anonymous,
    /// The public key that ships inside apps.
    ClientKey,
    /// A customer JWT whose `sub` is the customer acted on (or no customer
    /// is named: the token acts on itself).
    CustomerSelf,
    /// A customer JWT acting on another customer.
    CustomerOther,
    ServiceKey,
    /// An admin API key or a JWT with the admin claim.
    Admin,
}

impl Credential {
    pub const ALL: [Credential; 6] = [
        Credential::Anonymous,
        Credential::ClientKey,
        Credential::CustomerSelf,
        Credential::CustomerOther,
        Credential::ServiceKey,
        Credential::Admin,
    ];

    pub fn of(p: &Principal, target: Option<&str>) -> Credential {
        match p {
            Principal::Anonymous => Credential::Anonymous,
            Principal::Customer(sub) => match target {
                Some(t) if t != sub => Credential::CustomerOther,
                _ => Credential::CustomerSelf,
            },
            Principal::AdminToken(_)
            | Principal::ApiKey {
                role: ApiKeyRole::Admin,
                ..
            } => Credential::Admin,
            Principal::ApiKey {
                role: ApiKeyRole::Service,
                ..
            } => Credential::ServiceKey,
            Principal::ApiKey {
                role: ApiKeyRole::Client,
                ..
            } => Credential::ClientKey,
        }
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allow(u8);

impl Allow {
    const fn of(creds: &[Credential]) -> Allow {
        let mut bits = 0;
        let mut i = 0;
        while i < creds.len() {
            bits |= creds[i].bit();
            i += 1;
        }
        Allow(bits)
    }

    pub const fn contains(self, c: Credential) -> bool {
        self.0 & c.bit() != 0
    }
}

use Credential::{Admin, ClientKey, CustomerSelf, ServiceKey};

macro_rules! actions {
    ($($(#[$m:meta])* $name:ident => [$($who:ident),*], $refusal:literal;)*) => {
        /// Everything a credential can be allowed to do.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Action {
            $($(#[$m])* $name,)*
        }

        impl Action {
            pub const ALL: &[Action] = &[$(Action::$name),*];

            /// The credentials allowed to take this action.
            pub const fn allowed(self) -> Allow {
                match self {
                    $(Action::$name => Allow::of(&[$($who),*]),)*
                }
            }

            /// What a refused caller is told (never whose data it was).
            pub const fn refusal(self) -> &'static str {
                match self {
                    $(Action::$name => $refusal,)*
                }
            }
        }
    };
}

actions! {
    /// The product catalog, for paywalls.
    ReadCatalog => [ClientKey, CustomerSelf, ServiceKey, Admin],
        "reading the catalog needs a credential";
    /// `me`: the customer the token names.
    ReadMe => [CustomerSelf, Admin],
        "`me` needs a customer token";
    /// The entitlement summary: id, paid status, entitlements (key, active,
    /// expiry, will renew, store, product, period type, status, grace), trial end.
    ReadCustomerSummary => [ClientKey, CustomerSelf, ServiceKey, Admin],
        "a customer may read only itself";
    /// The customer record beyond the summary (when it was created).
    ReadCustomerProfile => [CustomerSelf, ServiceKey, Admin],
        "the customer record needs the customer's token or a service key";
    ReadPurchases => [CustomerSelf, ServiceKey, Admin],
        "purchases need the customer's token or a service key";
    /// An entitlement's or a purchase's plain-language explanation: it tells
    /// of refunds, revocations and billing trouble, so not the public key's
    /// to read (not even of the purchase it has just submitted).
    ReadExplanation => [CustomerSelf, ServiceKey, Admin],
        "explanations need the customer's token or a service key";
    /// A purchase's store id: an App Store transaction id, a Play purchase
    /// token, a Stripe subscription id.
    ReadStorePurchaseId => [Admin],
        "store purchase ids need an admin credential";
    ReadDevices => [CustomerSelf, ServiceKey, Admin],
        "devices need the customer's token or a service key";
    /// Submissions as received: outcome, error, time.
    ReadReceipts => [ServiceKey, Admin],
        "receipts need a service or admin credential";
    /// The raw submission (signed transaction, purchase token, receipt).
    ReadReceiptPayload => [Admin],
        "receipt payloads need an admin credential";
    /// The entitlement change log.
    ReadEvents => [CustomerSelf, ServiceKey, Admin],
        "the change log needs the customer's token or a service key";
    ListCustomers => [Admin],
        "listing customers needs an admin credential";
    /// `entitlementChanged` for one customer: the summary's changes, live.
    WatchCustomer => [ClientKey, CustomerSelf, ServiceKey, Admin],
        "a customer may watch only itself";
    /// `entitlementChanged` without a customer: everyone's changes.
    WatchAllCustomers => [ServiceKey, Admin],
        "watching every customer needs a service or admin credential";
    /// Registering a device, or seeing it again, for the customer it is bound to.
    RegisterDevice => [ClientKey, CustomerSelf, Admin],
        "registering devices needs a client key, the customer's token or an admin";
    /// Moving a device that is bound to one customer to another.
    RebindDevice => [Admin],
        "moving a device to another customer needs an admin credential";
    /// `verifyPurchase` for the customer named (a token: itself).
    VerifyPurchase => [ClientKey, CustomerSelf, Admin],
        "submitting purchases needs a client key, the customer's token or an admin";
    /// Stripe Checkout: a signed-in customer pays for itself.
    Checkout => [CustomerSelf],
        "checkout and the billing portal need a signed-in customer";
    Portal => [CustomerSelf],
        "checkout and the billing portal need a signed-in customer";
    GrantEntitlement => [Admin],
        "grants need an admin credential";
    RevokeGrant => [Admin],
        "grants need an admin credential";
    /// `pairDevice`: a device's pairing code joins it to the signed-in
    /// customer; the code, not the credential, proves the device.
    PairDevice => [CustomerSelf],
        "pairing a device needs the signed-in customer's token";
    /// `mergeCustomers`: one customer into another, the old id an alias.
    MergeCustomers => [Admin],
        "merging customers needs an admin credential";
    /// The webhook log: every recorded store notification.
    ReadWebhookLog => [Admin],
        "the webhook log needs an admin credential";
    /// A recorded notification's verified payload (receipts, store ids,
    /// the buyer's details).
    ReadWebhookPayload => [Admin],
        "webhook payloads need an admin credential";
    /// The notifications that touched one customer (without payloads).
    ReadCustomerDeliveries => [ServiceKey, Admin],
        "store deliveries need a service or admin credential";
    /// Running a recorded notification again.
    ReplayWebhook => [Admin],
        "replaying webhooks needs an admin credential";
    /// Counts over every customer and the change log.
    ReadOverview => [Admin],
        "the overview needs an admin credential";
    /// `GET /api/subscriptions/check/{id}`.
    SubscriptionCheck => [ServiceKey, Admin],
        "the subscription check needs a service or admin credential";
}

/// The subscription check. Where the operator turned its key off
/// (`http.check_requires_key = false`, a route reachable from a private
/// network alone), a caller with no credential may ask too; a credential
/// that is presented must still be one that may check.
pub fn authorize_check(p: &Principal, customer: &str, key_required: bool) -> AppResult<()> {
    if !key_required && *p == Principal::Anonymous {
        return Ok(());
    }
    authorize(p, Action::SubscriptionCheck, Some(customer))
}

/// `Ok` when `p` may take `action` on `target` (the customer acted on, when
/// there is one); otherwise `UNAUTHENTICATED` for no credential and
/// `FORBIDDEN` for the wrong one.
pub fn authorize(p: &Principal, action: Action, target: Option<&str>) -> AppResult<()> {
    match Credential::of(p, target) {
        c if action.allowed().contains(c) => Ok(()),
        Credential::Anonymous => Err(AppError::Unauthenticated),
        _ => Err(AppError::Forbidden(action.refusal())),
    }
}

pub fn permits(p: &Principal, action: Action, target: Option<&str>) -> bool {
    action.allowed().contains(Credential::of(p, target))
}

/// How a field or route is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Its resolver or handler asks [`authorize`] for this action.
    Guard(Action),
    /// Readable by whoever was allowed to reach the object that holds it.
    Inherit,
    /// No credential: health, playground files.
    Public,
    /// The store's own signature, checked by its connector; never our keys.
    StoreSignature,
}

use Access::{Guard, Inherit, Public, StoreSignature};
use Action::*;

/// Every field of every GraphQL object type, as `Type.field`. A field
/// missing here fails the schema test: adding one means deciding who may read it.
/// A new root field or a path to another customer's rows gets an `Action`
/// (with its line in `actions!`), a `Guard` entry here, an `authorize` call
/// in its resolver, and a row in the credential matrix of `tests/policy.rs`.
pub const FIELDS: &[(&str, Access)] = &[
    ("QueryRoot.me", Guard(ReadMe)),
    ("QueryRoot.customer", Guard(ReadCustomerSummary)),
    ("QueryRoot.customers", Guard(ListCustomers)),
    ("QueryRoot.products", Guard(ReadCatalog)),
    ("QueryRoot.webhookEvents", Guard(ReadWebhookLog)),
    ("QueryRoot.overview", Guard(ReadOverview)),
    ("MutationRoot.registerDevice", Guard(RegisterDevice)),
    ("MutationRoot.createCheckoutSession", Guard(Checkout)),
    ("MutationRoot.createPortalSession", Guard(Portal)),
    ("MutationRoot.verifyPurchase", Guard(VerifyPurchase)),
    ("MutationRoot.grantEntitlement", Guard(GrantEntitlement)),
    ("MutationRoot.revokeGrant", Guard(RevokeGrant)),
    ("MutationRoot.pairDevice", Guard(PairDevice)),
    ("MutationRoot.mergeCustomers", Guard(MergeCustomers)),
    ("MutationRoot.replayWebhookEvent", Guard(ReplayWebhook)),
    ("SubscriptionRoot.entitlementChanged", Guard(WatchCustomer)),
    ("Customer.id", Inherit),
    ("Customer.createdAt", Guard(ReadCustomerProfile)),
    ("Customer.paidStatus", Inherit),
    ("Customer.trialEndsAt", Inherit),
    ("Customer.entitlements", Inherit),
    ("Customer.entitlement", Inherit),
    // The signed form of the summary: the same readers.
    ("Customer.entitlementToken", Guard(ReadCustomerSummary)),
    ("Customer.purchases", Guard(ReadPurchases)),
    ("Customer.devices", Guard(ReadDevices)),
    ("Customer.receipts", Guard(ReadReceipts)),
    ("Customer.events", Guard(ReadEvents)),
    ("Customer.webhookEvents", Guard(ReadCustomerDeliveries)),
    ("Entitlement.key", Inherit),
    ("Entitlement.isActive", Inherit),
    ("Entitlement.expiresAt", Inherit),
    ("Entitlement.willRenew", Inherit),
    ("Entitlement.store", Inherit),
    ("Entitlement.productId", Inherit),
    ("Entitlement.periodType", Inherit),
    ("Entitlement.status", Inherit),
    ("Entitlement.gracePeriodExpiresAt", Inherit),
    ("Entitlement.purchaseId", Guard(ReadPurchases)),
    ("Entitlement.explanation", Guard(ReadExplanation)),
    ("Purchase.id", Inherit),
    ("Purchase.store", Inherit),
    ("Purchase.storePurchaseId", Guard(ReadStorePurchaseId)),
    ("Purchase.productId", Inherit),
    ("Purchase.environment", Inherit),
    ("Purchase.status", Inherit),
    // `status` read at the current time: nothing beyond the stored fields.
    ("Purchase.effectiveStatus", Inherit),
    ("Purchase.periodType", Inherit),
    ("Purchase.purchasedAt", Inherit),
    ("Purchase.expiresAt", Inherit),
    ("Purchase.graceExpiresAt", Inherit),
    ("Purchase.autoRenew", Inherit),
    ("Purchase.canceledAt", Inherit),
    ("Purchase.revokedAt", Inherit),
    ("Purchase.renewalCount", Inherit),
    ("Purchase.sourceUpdatedAt", Inherit),
    ("Purchase.explanation", Guard(ReadExplanation)),
    ("Device.platform", Inherit),
    ("Device.deviceId", Inherit),
    ("Device.customerId", Inherit),
    ("Device.firstSeenAt", Inherit),
    ("Device.lastSeenAt", Inherit),
    ("Receipt.id", Inherit),
    ("Receipt.store", Inherit),
    ("Receipt.receivedAt", Inherit),
    ("Receipt.outcome", Inherit),
    ("Receipt.error", Inherit),
    ("Receipt.purchaseId", Inherit),
    ("Receipt.payload", Guard(ReadReceiptPayload)),
    ("EntitlementEvent.id", Inherit),
    ("EntitlementEvent.entitlement", Inherit),
    ("EntitlementEvent.kind", Inherit),
    ("EntitlementEvent.oldStatus", Inherit),
    ("EntitlementEvent.newStatus", Inherit),
    // The cause behind the access level (refunded, billing_retry, ...): the
    // entitlement summary's own status, nothing of the store's.
    ("EntitlementEvent.reason", Inherit),
    ("EntitlementEvent.purchaseId", Inherit),
    ("EntitlementEvent.occurredAt", Inherit),
    ("EntitlementEvent.publishedAt", Inherit),
    ("EntitlementChange.eventId", Inherit),
    ("EntitlementChange.customerId", Inherit),
    ("EntitlementChange.entitlement", Inherit),
    ("EntitlementChange.kind", Inherit),
    ("EntitlementChange.oldStatus", Inherit),
    ("EntitlementChange.newStatus", Inherit),
    ("EntitlementChange.reason", Inherit),
    ("EntitlementChange.occurredAt", Inherit),
    // The answer to a registration: the device as registered and the
    // summary of the customer it is bound to.
    ("RegisterDevicePayload.customer", Inherit),
    ("RegisterDevicePayload.device", Inherit),
    ("RegisterDevicePayload.created", Inherit),
    // The answer to a submission: the purchase the caller itself proved it
    // holds (its store id still admin-only) and the customer's summary.
    ("VerifyPurchasePayload.customer", Inherit),
    ("VerifyPurchasePayload.purchase", Inherit),
    ("CheckoutSession.id", Inherit),
    ("CheckoutSession.url", Inherit),
    ("PortalSession.url", Inherit),
    ("Product.id", Inherit),
    ("Product.displayName", Inherit),
    ("Product.entitlements", Inherit),
    ("Product.stripePriceId", Inherit),
    ("Product.appStoreProductId", Inherit),
    ("Product.playStoreProductId", Inherit),
    ("Product.kind", Inherit),
    ("CustomerConnection.pageInfo", Inherit),
    ("CustomerConnection.edges", Inherit),
    ("CustomerConnection.nodes", Inherit),
    ("CustomerEdge.cursor", Inherit),
    ("CustomerEdge.node", Inherit),
    // The webhook log: reached only through admin (or, per customer,
    // service) guards; the payload is guarded again at its leaf.
    ("WebhookEvent.id", Inherit),
    ("WebhookEvent.store", Inherit),
    ("WebhookEvent.eventId", Inherit),
    ("WebhookEvent.type", Inherit),
    ("WebhookEvent.outcome", Inherit),
    ("WebhookEvent.customerId", Inherit),
    ("WebhookEvent.error", Inherit),
    ("WebhookEvent.receivedAt", Inherit),
    ("WebhookEvent.replayedAt", Inherit),
    ("WebhookEvent.replayable", Inherit),
    ("WebhookEvent.payload", Guard(ReadWebhookPayload)),
    ("WebhookEventConnection.pageInfo", Inherit),
    ("WebhookEventConnection.edges", Inherit),
    ("WebhookEventConnection.nodes", Inherit),
    ("WebhookEventEdge.cursor", Inherit),
    ("WebhookEventEdge.node", Inherit),
    ("WebhookReplay.previousOutcome", Inherit),
    ("WebhookReplay.outcome", Inherit),
    ("WebhookReplay.ran", Inherit),
    ("WebhookReplay.event", Inherit),
    ("Overview.now", Inherit),
    ("Overview.days", Inherit),
    ("OverviewNow.customersWithAccess", Inherit),
    ("OverviewNow.byStore", Inherit),
    ("OverviewNow.inTrial", Inherit),
    ("OverviewNow.inGracePeriod", Inherit),
    ("OverviewNow.inBillingRetry", Inherit),
    ("StoreCount.store", Inherit),
    ("StoreCount.customers", Inherit),
    ("OverviewDay.day", Inherit),
    ("OverviewDay.newTrials", Inherit),
    ("OverviewDay.trialConversions", Inherit),
    ("OverviewDay.renewals", Inherit),
    ("OverviewDay.cancellations", Inherit),
    ("OverviewDay.refunds", Inherit),
    ("PageInfo.hasPreviousPage", Inherit),
    ("PageInfo.hasNextPage", Inherit),
    ("PageInfo.startCursor", Inherit),
    ("PageInfo.endCursor", Inherit),
];

/// Every REST route, as `METHOD path` in the router's own syntax.
pub const ROUTES: &[(&str, Access)] = &[
    ("POST /user", Guard(RegisterDevice)),
    (
        "GET /api/subscriptions/check/{customer_id}",
        Guard(SubscriptionCheck),
    ),
    ("POST /webhooks/stripe", StoreSignature),
    ("POST /webhooks/google", StoreSignature),
    ("POST /webhooks/apple", StoreSignature),
    // Public keys only; verifiers fetch them without a credential.
    ("GET /.well-known/jwks.json", Public),
    ("GET /health", Public),
    ("GET /ready", Public),
    // Bound privately by the operator; it carries counters, no customer data.
    ("GET /metrics", Public),
    ("GET /playground", Public),
    ("GET /playground/", Public),
    ("GET /playground/{file}", Public),
    // GraphiQL and the GraphQL endpoints: each field is guarded by `FIELDS`.
    ("GET /graphql", Public),
    ("POST /graphql", Public),
    ("GET /graphql/ws", Public),
];

/// The protection of a GraphQL field, `Type.field`.
pub fn field(coordinate: &str) -> Option<Access> {
    FIELDS
        .iter()
        .find(|(c, _)| *c == coordinate)
        .map(|(_, a)| *a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(role: ApiKeyRole) -> Principal {
        Principal::ApiKey {
            id: "k".into(),
            role,
        }
    }

    #[test]
    fn credentials_relative_to_the_target() {
        let alice = Principal::Customer("alice".into());
        assert_eq!(
            Credential::of(&alice, Some("alice")),
            Credential::CustomerSelf
        );
        assert_eq!(Credential::of(&alice, None), Credential::CustomerSelf);
        assert_eq!(
            Credential::of(&alice, Some("bob")),
            Credential::CustomerOther
        );
        assert_eq!(
            Credential::of(&key(ApiKeyRole::Client), Some("bob")),
            Credential::ClientKey
        );
        assert_eq!(
            Credential::of(&Principal::AdminToken("ops".into()), Some("bob")),
            Credential::Admin
        );
        assert_eq!(
            Credential::of(&key(ApiKeyRole::Admin), None),
            Credential::Admin
        );
        assert_eq!(
            Credential::of(&key(ApiKeyRole::Service), None),
            Credential::ServiceKey
        );
    }

    #[test]
    fn refusals_carry_the_right_code() {
        let err = authorize(&Principal::Anonymous, ReadCatalog, None).unwrap_err();
        assert_eq!(err.code(), "UNAUTHENTICATED");
        let err = authorize(&key(ApiKeyRole::Client), ReadReceiptPayload, Some("a")).unwrap_err();
        assert_eq!(err.code(), "FORBIDDEN");
        let alice = Principal::Customer("alice".into());
        assert!(authorize(&alice, ReadPurchases, Some("alice")).is_ok());
        assert_eq!(
            authorize(&alice, ReadPurchases, Some("bob"))
                .unwrap_err()
                .code(),
            "FORBIDDEN"
        );
    }

    #[test]
    fn nobody_but_admin_reads_secrets_or_moves_devices() {
        for a in [
            ReadReceiptPayload,
            ReadStorePurchaseId,
            RebindDevice,
            ReadWebhookLog,
            ReadWebhookPayload,
            ReplayWebhook,
            ReadOverview,
        ] {
            for c in Credential::ALL {
                assert_eq!(
                    a.allowed().contains(c),
                    c == Credential::Admin,
                    "{a:?} {c:?}"
                );
            }
        }
    }

    #[test]
    fn anonymous_and_other_customers_never_pass() {
        for a in Action::ALL {
            assert!(!a.allowed().contains(Credential::Anonymous), "{a:?}");
            assert!(!a.allowed().contains(Credential::CustomerOther), "{a:?}");
        }
    }

    #[test]
    fn every_schema_field_has_exactly_one_entry_and_no_entry_is_stale() {
        let sdl = crate::graphql::sdl();
        let doc = async_graphql::parser::parse_schema(&sdl).expect("exported SDL parses");
        let mut in_schema = std::collections::BTreeSet::new();
        for def in &doc.definitions {
            let async_graphql::parser::types::TypeSystemDefinition::Type(t) = def else {
                continue;
            };
            let t = &t.node;
            if let async_graphql::parser::types::TypeKind::Object(o) = &t.kind {
                for f in &o.fields {
                    in_schema.insert(format!("{}.{}", t.name.node, f.node.name.node));
                }
            }
        }
        let mut listed = std::collections::BTreeSet::new();
        for (c, _) in FIELDS {
            assert!(listed.insert(c.to_string()), "{c} listed twice");
        }
        let missing: Vec<_> = in_schema.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "fields with no policy entry: {missing:?}"
        );
        let stale: Vec<_> = listed.difference(&in_schema).collect();
        assert!(stale.is_empty(), "policy entries for no field: {stale:?}");
        for root in ["QueryRoot.", "MutationRoot.", "SubscriptionRoot."] {
            for (c, a) in FIELDS.iter().filter(|(c, _)| c.starts_with(root)) {
                assert!(
                    matches!(a, Guard(_)),
                    "{c} is a root field: it needs a guard"
                );
            }
        }
    }
}
