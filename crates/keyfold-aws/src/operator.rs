//! What only the host's operator decides, never a tenant's config
//! (docs/THREAT_MODEL.md, "Tenant and operator settings"): where KMS requests
//! go, and which AWS accounts a tenant may name.
//!
//! A tenant's [`AwsConfig`] names the key, its region, the role to assume and
//! the external id. Everything here is set on [`AwsWrapperFactory`] or
//! [`AwsKmsWrapperBuilder`] by the host, and checked at build time with a
//! typed [`ConfigError`].
//!
//! [`AwsWrapperFactory`]: crate::AwsWrapperFactory
//! [`AwsKmsWrapperBuilder`]: crate::AwsKmsWrapperBuilder

use keyfold_core::config::{AwsConfig, AwsKeyRef, ConfigError, Endpoint};

use crate::PROVIDER;

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::InvalidField {
        provider: PROVIDER,
        field,
        reason: reason.into(),
    }
}

/// Checks an operator's KMS endpoint override for keys in `region`.
///
/// Accepted: `https://` to an AWS KMS host of that region, with no user
/// info, no port other than 443 and no path:
/// - `kms.REGION.amazonaws.com` and `kms-fips.REGION.amazonaws.com`
///   (`.amazonaws.com.cn` in the China regions),
/// - the dual-stack `kms.REGION.api.aws` and `kms-fips.REGION.api.aws`,
/// - an interface VPC endpoint, `vpce-ID.kms.REGION.vpce.amazonaws.com`
///   (zonal names included).
///
/// A loopback host (`localhost`, `127.0.0.0/8`, `::1`, over `http://` or
/// `https://`, any port) is accepted only when `allow_loopback` is set: the
/// operator's switch for a local emulator in tests. Everything else (private
/// and link-local addresses such as `169.254.169.254`, other hosts, a
/// trailing dot, percent-encoding or non-ASCII names) is refused: KMS
/// requests carry signed credentials, and during a re-wrap a tenant's master
/// keys.
///
/// ```
/// use keyfold_aws::check_kms_endpoint;
/// check_kms_endpoint("https://kms-fips.us-east-1.amazonaws.com", "us-east-1", false)?;
/// check_kms_endpoint(
///     "https://vpce-0a1b2c3d4e5f6a7b8-abcdefgh.kms.us-east-1.vpce.amazonaws.com",
///     "us-east-1",
///     false,
/// )?;
/// assert!(check_kms_endpoint("https://169.254.169.254", "us-east-1", false).is_err());
/// assert!(check_kms_endpoint("http://127.0.0.1:5000", "us-east-1", false).is_err());
/// check_kms_endpoint("http://127.0.0.1:5000", "us-east-1", true)?;
/// # Ok::<(), keyfold_core::config::ConfigError>(())
/// ```
///
/// # Errors
/// [`ConfigError::InvalidField`] (field `endpoint_url`) saying what is accepted.
pub fn check_kms_endpoint(
    url: &str,
    region: &str,
    allow_loopback: bool,
) -> Result<(), ConfigError> {
    const FIELD: &str = "endpoint_url";
    let endpoint = Endpoint::parse(url).filter(|_| only_scheme_and_authority(url));
    let Some(endpoint) = endpoint else {
        return Err(invalid(
            FIELD,
            "must be https://HOST[:PORT] with a plain host, no user info and no path",
        ));
    };
    if endpoint.is_loopback() {
        return if allow_loopback {
            Ok(())
        } else {
            Err(invalid(
                FIELD,
                "a loopback endpoint is accepted only when the operator allows loopback endpoints for tests",
            ))
        };
    }
    if !endpoint.https {
        return Err(invalid(FIELD, "must be https://"));
    }
    if endpoint.port.is_some_and(|p| p != 443) {
        return Err(invalid(FIELD, "an AWS KMS endpoint listens on port 443"));
    }
    if !is_kms_host(&endpoint.host.to_ascii_lowercase(), region) {
        return Err(invalid(
            FIELD,
            format!(
                "{:?} is not an AWS KMS host of region {region} (kms.{region}.amazonaws.com, \
                 kms-fips.{region}.amazonaws.com, kms[-fips].{region}.api.aws, \
                 vpce-ID.kms.{region}.vpce.amazonaws.com)",
                endpoint.host
            ),
        ));
    }
    Ok(())
}

/// `scheme://authority` with at most a `/` after it.
fn only_scheme_and_authority(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    match rest.find(['/', '?', '#']) {
        None => true,
        Some(i) => rest.get(i..) == Some("/"),
    }
}

fn is_kms_host(host: &str, region: &str) -> bool {
    let china = region.starts_with("cn-");
    let suffix = if china {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    let regional = [
        format!("kms.{region}.{suffix}"),
        format!("kms-fips.{region}.{suffix}"),
        format!("kms.{region}.api.aws"),
        format!("kms-fips.{region}.api.aws"),
    ];
    if regional.iter().any(|h| h == host) {
        return true;
    }
    let vpce = format!(".kms.{region}.vpce.{suffix}");
    host.strip_suffix(&vpce)
        .and_then(|label| label.strip_prefix("vpce-"))
        .is_some_and(|id| {
            !id.is_empty()
                && id.len() <= 63
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// The account of an IAM role ARN (`arn:PARTITION:iam::ACCOUNT:role/NAME`).
pub(crate) fn role_account(role_arn: &str) -> Option<&str> {
    role_arn.split(':').nth(4)
}

/// Checks an operator's account pin: the role and, when the key reference
/// names one, the key's account must be in `allowed`.
pub(crate) fn check_accounts(config: &AwsConfig, allowed: &[String]) -> Result<(), ConfigError> {
    if let Some(bad) = allowed
        .iter()
        .find(|a| a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid(
            "allowed_accounts",
            format!("{bad:?} is not a 12-digit AWS account id"),
        ));
    }
    let is_allowed = |account: &str| allowed.iter().any(|a| a == account);
    let list = allowed.join(", ");
    let role = role_account(&config.role_arn).unwrap_or_default();
    if !is_allowed(role) {
        return Err(invalid(
            "role_arn",
            format!("the role's account {role} is not one this tenant may use ({list})"),
        ));
    }
    let key_account = match AwsKeyRef::parse(&config.kms_key_ref)? {
        AwsKeyRef::KeyArn { account, .. } | AwsKeyRef::AliasArn { account, .. } => Some(account),
        _ => None,
    };
    if let Some(account) = key_account.filter(|a| !is_allowed(a)) {
        return Err(invalid(
            "kms_key_ref",
            format!("the key's account {account} is not one this tenant may use ({list})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kms_hosts_of_the_region_only() {
        for host in [
            "kms.eu-west-1.amazonaws.com",
            "kms-fips.eu-west-1.amazonaws.com",
            "kms.eu-west-1.api.aws",
            "vpce-0abc-def.kms.eu-west-1.vpce.amazonaws.com",
        ] {
            assert!(is_kms_host(host, "eu-west-1"), "{host}");
        }
        assert!(is_kms_host("kms.cn-north-1.amazonaws.com.cn", "cn-north-1"));
        for host in [
            "kms.us-east-1.amazonaws.com",
            "kms.eu-west-1.amazonaws.com.evil.example",
            "evil.kms.eu-west-1.amazonaws.com",
            "vpce-.kms.eu-west-1.vpce.amazonaws.com",
            "vpce-a.b.kms.eu-west-1.vpce.amazonaws.com",
            "x.kms.eu-west-1.vpce.amazonaws.com",
            "kms.eu-west-1.amazonaws.com.cn",
        ] {
            assert!(!is_kms_host(host, "eu-west-1"), "{host}");
        }
    }
}
