//! The store account tokens that name a customer. Apps set Apple's
//! `appAccountToken` (a UUID) from their own user id, in one of the ways
//! the original set-ups use; a notification carries only the token, so every
//! form is indexed.

use uuid::Uuid;

/// Namespace of the UUID v5 token of a non-UUID customer id; fixed forever,
/// since apps derive their tokens from it.
pub const ACCOUNT_TOKEN_NAMESPACE: Uuid =
    Uuid::from_u128(0x5d1e_46b0_65a3_5e07_9d0a_58e1_c8a4_2f31);

/// The token an app is told to set for `customer_id`: the id itself when it
/// is a UUID, otherwise its UUID v5 in [`ACCOUNT_TOKEN_NAMESPACE`].
pub fn account_token(customer_id: &str) -> Uuid {
    Uuid::parse_str(customer_id)
        .unwrap_or_else(|_| Uuid::new_v5(&ACCOUNT_TOKEN_NAMESPACE, customer_id.as_bytes()))
}

/// Every token that names `customer_id`: [`account_token`], and for a
/// decimal integer id also `%08x-0000-0000-0000-000000000000` of it, the
/// form apps keyed by integer user ids set.
pub fn account_tokens(customer_id: &str) -> Vec<Uuid> {
    let mut out = vec![account_token(customer_id)];
    if let Ok(n) = customer_id.parse::<u32>()
        && n.to_string() == customer_id
    {
        out.push(Uuid::from_u128(u128::from(n) << 96));
    }
    out
}

/// Whether the store binding `key` (an account token, or a store's account
/// id that is the customer id itself) names `customer_id`.
pub fn names(key: &str, customer_id: &str) -> bool {
    key == customer_id
        || Uuid::parse_str(key).is_ok_and(|k| account_tokens(customer_id).contains(&k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_forms() {
        let u = "7e3fb20b-4cdb-47cc-936d-99d65f608138";
        assert_eq!(account_tokens(u), vec![Uuid::parse_str(u).unwrap()]);
        assert_eq!(account_token("alice"), account_token("alice"));
        assert_ne!(account_token("alice"), account_token("bob"));
        assert_eq!(
            account_tokens("42")[1].to_string(),
            "0000002a-0000-0000-0000-000000000000"
        );
        // Not the canonical decimal form: no integer token.
        assert_eq!(account_tokens("042").len(), 1);
        assert_eq!(account_tokens("-1").len(), 1);
        assert!(names("0000002a-0000-0000-0000-000000000000", "42"));
        assert!(names(&account_token("alice").to_string(), "alice"));
        assert!(names("alice", "alice"));
        assert!(!names(&account_token("bob").to_string(), "alice"));
        assert!(!names("not-a-uuid", "alice"));
    }

    #[test]
    fn migration_backfills_the_same_tokens() {
        for id in ["alice", "42", "7e3fb20b-4cdb-47cc-936d-99d65f608138", "0"] {
            assert_eq!(
                account_tokens(id),
                migration::m20261202_000004_store_bindings::account_tokens(id)
            );
        }
    }
}
