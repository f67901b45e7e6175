use sea_orm::entity::prelude::*;

/// A token-signing key. `private_key` is AES-256-GCM ciphertext; even so it
/// is kept out of `Debug`.
#[derive(Clone, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "signing_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub kid: String,
    /// `ES256` or `EdDSA`.
    pub algorithm: String,
    /// The public JWK as JSON, `kid` included.
    pub public_jwk: String,
    pub private_key: String,
    pub created_at: DateTimeUtc,
    /// When another key became current; this one signs nothing after.
    pub retired_at: Option<DateTimeUtc>,
    /// No token this key signed expires later.
    pub verify_until: Option<DateTimeUtc>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .field("verify_until", &self.verify_until)
            .finish_non_exhaustive()
    }
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
