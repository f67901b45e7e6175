use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::Store;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EntitlementDef {
    pub key: String,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProductKind {
    Subscription,
    /// Non-consumable / one-time payment: access with no end until refunded.
    Lifetime,
}

/// One sellable product and its id in each store that sells it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProductDef {
    /// Our own id, used by paywalls and `createCheckoutSession`.
    pub id: String,
    pub entitlements: Vec<String>,
    pub kind: ProductKind,
    #[serde(default)]
    pub display_name: Option<String>,
    /// Stripe price id (`price_…`).
    #[serde(default)]
    pub stripe_price_id: Option<String>,
    /// Stripe Payment Link id (`plink_…`): a completed Checkout Session
    /// from this link is this product, with or without a Stripe API key.
    #[serde(default)]
    pub stripe_payment_link: Option<String>,
    /// App Store product id.
    #[serde(default)]
    pub app_store_product_id: Option<String>,
    /// Play product id; subscriptions may name a base plan as `product:base_plan`.
    #[serde(default)]
    pub play_store_product_id: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrialPolicy {
    pub days: u32,
    pub entitlement: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TransferPolicy {
    /// Revoke from the old customer, grant to the new one.
    Transfer,
    /// Reject the second customer's submission.
    Keep,
}

/// The catalog, indexed for the engine's hot path.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    entitlements: Vec<EntitlementDef>,
    products: Vec<ProductDef>,
    by_store_product: HashMap<(Store, String), Vec<String>>,
}

impl Catalog {
    pub fn new(
        entitlements: Vec<EntitlementDef>,
        products: Vec<ProductDef>,
    ) -> Result<Self, String> {
        let mut keys = HashSet::new();
        for e in &entitlements {
            if e.key.is_empty() {
                return Err("an entitlement has an empty key".into());
            }
            if !keys.insert(e.key.as_str()) {
                return Err(format!("entitlement `{}` is defined twice", e.key));
            }
        }
        let mut ids = HashSet::new();
        let mut by_store_product: HashMap<(Store, String), Vec<String>> = HashMap::new();
        for p in &products {
            if !ids.insert(p.id.as_str()) {
                return Err(format!("product `{}` is defined twice", p.id));
            }
            if p.entitlements.is_empty() {
                return Err(format!("product `{}` grants no entitlement", p.id));
            }
            for e in &p.entitlements {
                if !keys.contains(e.as_str()) {
                    return Err(format!(
                        "product `{}` grants unknown entitlement `{e}`",
                        p.id
                    ));
                }
            }
            for (store, sid) in [
                (Store::Stripe, &p.stripe_price_id),
                // A purchase made through a link whose price the catalog does
                // not name is stored under the link id.
                (Store::Stripe, &p.stripe_payment_link),
                (Store::AppStore, &p.app_store_product_id),
                (Store::PlayStore, &p.play_store_product_id),
            ] {
                if let Some(sid) = sid {
                    let slot = by_store_product.entry((store, sid.clone())).or_default();
                    if !slot.is_empty() {
                        return Err(format!("{store} product `{sid}` is mapped by two products"));
                    }
                    slot.extend(p.entitlements.iter().cloned());
                }
            }
        }
        Ok(Catalog {
            entitlements,
            products,
            by_store_product,
        })
    }

    pub fn entitlements(&self) -> &[EntitlementDef] {
        &self.entitlements
    }

    pub fn products(&self) -> &[ProductDef] {
        &self.products
    }

    pub fn has_entitlement(&self, key: &str) -> bool {
        self.entitlements.iter().any(|e| e.key == key)
    }

    pub fn product(&self, id: &str) -> Option<&ProductDef> {
        self.products.iter().find(|p| p.id == id)
    }

    pub fn product_by_stripe_price(&self, price: &str) -> Option<&ProductDef> {
        self.products
            .iter()
            .find(|p| p.stripe_price_id.as_deref() == Some(price))
    }

    pub fn product_by_payment_link(&self, link: &str) -> Option<&ProductDef> {
        self.products
            .iter()
            .find(|p| p.stripe_payment_link.as_deref() == Some(link))
    }

    /// Entitlement keys a purchase unlocks. Trials and promotional grants name
    /// their entitlement directly in `product_id`. A Play product id also
    /// matches a catalog entry for the bare product when the purchase names a
    /// base plan (`product:plan`).
    pub fn entitlements_for(&self, store: Store, product_id: &str) -> Vec<&str> {
        match store {
            Store::Trial | Store::Promotional => {
                if self.has_entitlement(product_id) {
                    vec![
                        self.entitlements
                            .iter()
                            .find(|e| e.key == product_id)
                            .map(|e| e.key.as_str())
                            .unwrap_or_default(),
                    ]
                } else {
                    vec![]
                }
            }
            _ => {
                if let Some(v) = self.by_store_product.get(&(store, product_id.to_string())) {
                    return v.iter().map(String::as_str).collect();
                }
                if store == Store::PlayStore
                    && let Some((bare, _)) = product_id.split_once(':')
                    && let Some(v) = self.by_store_product.get(&(store, bare.to_string()))
                {
                    return v.iter().map(String::as_str).collect();
                }
                vec![]
            }
        }
    }
}
