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
    check_endpoint(Service::Kms, url, region, allow_loopback)
}

/// Checks an operator's STS endpoint override (where the base credentials'
/// signed `AssumeRole` calls go) for keys in `region`, as
/// [`check_kms_endpoint`] does for KMS: `https://` to
/// `sts.amazonaws.com` (the global endpoint), `sts.REGION.amazonaws.com`,
/// `sts-fips.REGION.amazonaws.com`, `sts[-fips].REGION.api.aws` or
/// `vpce-ID.sts.REGION.vpce.amazonaws.com`; loopback only with
/// `allow_loopback`.
///
/// ```
/// use keyfold_aws::check_sts_endpoint;
/// check_sts_endpoint("https://sts.eu-west-1.amazonaws.com", "eu-west-1", false)?;
/// assert!(check_sts_endpoint("https://kms.eu-west-1.amazonaws.com", "eu-west-1", false).is_err());
/// # Ok::<(), keyfold_core::config::ConfigError>(())
/// ```
///
/// # Errors
/// [`ConfigError::InvalidField`] (field `sts_endpoint_url`) saying what is
/// accepted.
pub fn check_sts_endpoint(
    url: &str,
    region: &str,
    allow_loopback: bool,
) -> Result<(), ConfigError> {
    check_endpoint(Service::Sts, url, region, allow_loopback)
}

/// The AWS services whose endpoints the operator may override.
#[derive(Clone, Copy)]
enum Service {
    Kms,
    Sts,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Kms => "kms",
            Service::Sts => "sts",
        }
    }

    fn field(self) -> &'static str {
        match self {
            Service::Kms => "endpoint_url",
            Service::Sts => "sts_endpoint_url",
        }
    }
}

fn check_endpoint(
    service: Service,
    url: &str,
    region: &str,
    allow_loopback: bool,
) -> Result<(), ConfigError> {
    let field = service.field();
    let endpoint = Endpoint::parse(url).filter(|_| only_scheme_and_authority(url));
    let Some(endpoint) = endpoint else {
        return Err(invalid(
            field,
            "must be https://HOST[:PORT] with a plain host, no user info and no path",
        ));
    };
    if endpoint.is_loopback() {
        return if allow_loopback {
            Ok(())
        } else {
            Err(invalid(
                field,
                "a loopback endpoint is accepted only when the operator allows loopback endpoints for tests",
            ))
        };
    }
    if !endpoint.https {
        return Err(invalid(field, "must be https://"));
    }
    if endpoint.port.is_some_and(|p| p != 443) {
        return Err(invalid(field, "an AWS endpoint listens on port 443"));
    }
    let host = endpoint.host.to_ascii_lowercase();
    let global_sts = matches!(service, Service::Sts) && host == "sts.amazonaws.com";
    if !global_sts && !is_service_host(service.name(), &host, region) {
        let s = service.name();
        return Err(invalid(
            field,
            format!(
                "{:?} is not an AWS {} host of region {region} ({s}.{region}.amazonaws.com, \
                 {s}-fips.{region}.amazonaws.com, {s}[-fips].{region}.api.aws, \
                 vpce-ID.{s}.{region}.vpce.amazonaws.com{})",
                endpoint.host,
                s.to_ascii_uppercase(),
                if global_sts || matches!(service, Service::Sts) {
                    ", sts.amazonaws.com"
                } else {
                    ""
                }
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

#[cfg(test)]
fn is_kms_host(host: &str, region: &str) -> bool {
    is_service_host("kms", host, region)
}

/// `SERVICE[-fips].REGION.amazonaws.com[.cn]`, `SERVICE[-fips].REGION.api.aws`
/// or `vpce-ID.SERVICE.REGION.vpce.amazonaws.com[.cn]`.
fn is_service_host(service: &str, host: &str, region: &str) -> bool {
    let china = region.starts_with("cn-");
    let suffix = if china {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    let regional = [
        format!("{service}.{region}.{suffix}"),
        format!("{service}-fips.{region}.{suffix}"),
        format!("{service}.{region}.api.aws"),
        format!("{service}-fips.{region}.api.aws"),
    ];
    if regional.iter().any(|h| h == host) {
        return true;
    }
    let vpce = format!(".{service}.{region}.vpce.{suffix}");
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
