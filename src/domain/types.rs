use std::fmt;

/// Defines a closed set of string-backed values: the database and the wire
/// both store the snake_case name, and parsing anything else is an error.
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ::serde::Serialize, ::serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::domain::types::UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$variant),)+
                    _ => Err($crate::domain::types::UnknownValue { kind: stringify!($name), value: s.to_string() }),
                }
            }
        }
    };
}
pub(crate) use string_enum;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`")]
pub struct UnknownValue {
    pub kind: &'static str,
    pub value: String,
}

string_enum!(
    /// Who took the money (or, for trials and grants, who gave access).
    Store {
        AppStore => "app_store",
        PlayStore => "play_store",
        Stripe => "stripe",
        Promotional => "promotional",
        Trial => "trial",
    }
);

impl Store {
    /// Sources that count as paid for `paid_status` (promotional grants do).
    pub fn is_paid(self) -> bool {
        !matches!(self, Store::Trial)
    }
}

string_enum!(Environment {
    Production => "production",
    Sandbox => "sandbox",
});

string_enum!(
    /// A purchase's state as the store (or we, for trials and grants) last reported it.
    PurchaseStatus {
        Active => "active",
        Trialing => "trialing",
        Canceled => "canceled",
        InGracePeriod => "in_grace_period",
        InBillingRetry => "in_billing_retry",
        OnHold => "on_hold",
        Paused => "paused",
        Expired => "expired",
        Refunded => "refunded",
        Revoked => "revoked",
        Pending => "pending",
    }
);

impl PurchaseStatus {
    /// Upper-case name used in the change log and the event stream.
    pub fn event_name(self) -> &'static str {
        match self {
            PurchaseStatus::Active => "ACTIVE",
            PurchaseStatus::Trialing => "TRIALING",
            PurchaseStatus::Canceled => "CANCELED",
            PurchaseStatus::InGracePeriod => "IN_GRACE_PERIOD",
            PurchaseStatus::InBillingRetry => "IN_BILLING_RETRY",
            PurchaseStatus::OnHold => "ON_HOLD",
            PurchaseStatus::Paused => "PAUSED",
            PurchaseStatus::Expired => "EXPIRED",
            PurchaseStatus::Refunded => "REFUNDED",
            PurchaseStatus::Revoked => "REVOKED",
            PurchaseStatus::Pending => "PENDING",
        }
    }
}

impl PurchaseStatus {
    /// The cause a change-log row gives beside its access-level status.
    pub fn reason(self) -> &'static str {
        match self {
            PurchaseStatus::Active => "active",
            PurchaseStatus::Trialing => "trialing",
            PurchaseStatus::Canceled => "canceled",
            PurchaseStatus::InGracePeriod => "grace_period",
            PurchaseStatus::InBillingRetry => "billing_retry",
            PurchaseStatus::OnHold => "on_hold",
            PurchaseStatus::Paused => "paused",
            PurchaseStatus::Expired => "expired",
            PurchaseStatus::Refunded => "refunded",
            PurchaseStatus::Revoked => "revoked",
            PurchaseStatus::Pending => "pending",
        }
    }
}

/// Access-level statuses of the change log and every event sink: a consumer
/// that enables on `ACTIVE` and disables on `EXPIRED` is right for every
/// change; the cause is in the row's `reason`.
pub const STATUS_ACTIVE: &str = "ACTIVE";
pub const STATUS_EXPIRED: &str = "EXPIRED";

string_enum!(PeriodType {
    Normal => "normal",
    Trial => "trial",
    Intro => "intro",
});

string_enum!(Platform {
    Garmin => "garmin",
    Ios => "ios",
    Android => "android",
    Web => "web",
});

string_enum!(PaidStatus {
    Paid => "paid",
    Trial => "trial",
    Expired => "expired",
});

impl PaidStatus {
    /// The original Garmin backend's `status` field, which older watch code reads.
    pub fn legacy_status(self) -> &'static str {
        match self {
            PaidStatus::Paid => "paid",
            PaidStatus::Trial => "trial",
            PaidStatus::Expired => "trial_ended",
        }
    }
}

string_enum!(EventKind {
    Granted => "granted",
    Renewed => "renewed",
    BillingIssue => "billing_issue",
    Canceled => "canceled",
    Uncanceled => "uncanceled",
    Expired => "expired",
    Refunded => "refunded",
    Revoked => "revoked",
    Transferred => "transferred",
    ProductChanged => "product_changed",
});

string_enum!(ApiKeyRole {
    Client => "client",
    Service => "service",
    Admin => "admin",
});

/// A validated external identifier (customer id, device id): 1..=256 bytes,
/// no control characters, no surrounding whitespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExternalId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id must not be empty")]
    Empty,
    #[error("id must be at most 256 bytes")]
    TooLong,
    #[error("id must not contain control characters")]
    ControlCharacter,
    #[error("id must not start or end with whitespace")]
    Whitespace,
}

impl ExternalId {
    pub const MAX_LEN: usize = 256;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(IdError::TooLong);
        }
        if s.chars().any(char::is_control) {
            return Err(IdError::ControlCharacter);
        }
        if s.trim() != s {
            return Err(IdError::Whitespace);
        }
        Ok(ExternalId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for ExternalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_their_names() {
        for s in PurchaseStatus::ALL {
            assert_eq!(s.as_str().parse::<PurchaseStatus>().unwrap(), *s);
        }
        for s in Store::ALL {
            assert_eq!(s.as_str().parse::<Store>().unwrap(), *s);
        }
        assert!("bogus".parse::<Store>().is_err());
    }

    #[test]
    fn ids_are_validated() {
        assert!(ExternalId::parse("device-123").is_ok());
        assert_eq!(ExternalId::parse(""), Err(IdError::Empty));
        assert_eq!(ExternalId::parse(&"a".repeat(257)), Err(IdError::TooLong));
        assert!(ExternalId::parse(&"a".repeat(256)).is_ok());
        assert_eq!(ExternalId::parse("a\nb"), Err(IdError::ControlCharacter));
        assert_eq!(ExternalId::parse("a\u{7f}"), Err(IdError::ControlCharacter));
        assert_eq!(ExternalId::parse(" a"), Err(IdError::Whitespace));
    }
}
