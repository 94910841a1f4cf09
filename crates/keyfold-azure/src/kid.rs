//! Key Vault key identifiers (`kid`): `https://VAULT/keys/NAME/VERSION`.

use std::fmt;

/// A parsed, versioned Key Vault key identifier, as `wrapKey` returns it and
/// as keyfold records it in [`WrappedKey::kms_key_version`](keyfold_core::WrappedKey::kms_key_version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId {
    /// `https://HOST` (no trailing slash), lower-cased host.
    pub vault_url: String,
    /// Key name.
    pub name: String,
    /// Key version.
    pub version: String,
}

impl KeyId {
    /// Parses `https://HOST[:PORT]/keys/NAME/VERSION` (a query string is ignored).
    /// Unlike a configured key reference, any host is accepted here: the
    /// caller compares the vault and name with its own key.
    ///
    /// # Errors
    /// A message saying what is wrong, when `kid` is not a versioned key id.
    pub fn parse(kid: &str) -> Result<Self, String> {
        let rest = kid
            .strip_prefix("https://")
            .ok_or_else(|| format!("key id {kid:?} does not start with https://"))?;
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let parts: Vec<&str> = rest.split('/').collect();
        let [host, "keys", name, version] = parts.as_slice() else {
            return Err(format!(
                "key id {kid:?} is not https://VAULT/keys/NAME/VERSION"
            ));
        };
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 127
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if host.is_empty() || !segment_ok(name) || !segment_ok(version) {
            return Err(format!(
                "key id {kid:?} has an empty host, or a bad key name or version"
            ));
        }
        Ok(KeyId {
            vault_url: format!("https://{}", host.to_ascii_lowercase()),
            name: (*name).to_owned(),
            version: (*version).to_owned(),
        })
    }

    /// True when this id names key `name` in vault `vault_url` (Key Vault
    /// compares names and hosts case-insensitively).
    pub fn is_key(&self, vault_url: &str, name: &str) -> bool {
        self.vault_url
            .eq_ignore_ascii_case(vault_url.trim_end_matches('/'))
            && self.name.eq_ignore_ascii_case(name)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/keys/{}/{}", self.vault_url, self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versioned_ids() {
        let id = KeyId::parse(
            "https://My-Vault.vault.azure.net/keys/tenant-a/0123456789abcdef0123456789abcdef?api-version=2025-07-01",
        );
        assert_eq!(
            id,
            Ok(KeyId {
                vault_url: "https://my-vault.vault.azure.net".into(),
                name: "tenant-a".into(),
                version: "0123456789abcdef0123456789abcdef".into(),
            })
        );
        let id = id.unwrap_or_else(|e| unreachable!("{e}"));
        assert!(id.is_key("https://my-vault.vault.azure.net/", "Tenant-A"));
        assert!(!id.is_key("https://other.vault.azure.net", "tenant-a"));
        assert!(!id.is_key("https://my-vault.vault.azure.net", "tenant-b"));
        assert_eq!(
            id.to_string(),
            "https://my-vault.vault.azure.net/keys/tenant-a/0123456789abcdef0123456789abcdef"
        );
    }

    #[test]
    fn refuses_unversioned_or_foreign_ids() {
        for bad in [
            "http://v.vault.azure.net/keys/k/1",
            "https://v.vault.azure.net/keys/k",
            "https://v.vault.azure.net/keys/k/",
            "https://v.vault.azure.net/secrets/k/1",
            "https://v.vault.azure.net/keys/k/1/extra",
            "https://v.vault.azure.net/keys/k/v%2F1",
            "https:///keys/k/1",
        ] {
            assert!(KeyId::parse(bad).is_err(), "{bad}");
        }
    }
}
