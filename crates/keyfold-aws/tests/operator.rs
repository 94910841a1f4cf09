//! Tenant and operator settings (docs/THREAT_MODEL.md, "Tenant and operator
//! settings"): a tenant config cannot choose the KMS endpoint, the operator's
//! endpoint must be an AWS KMS host (loopback only behind the test switch),
//! and a tenant pinned to accounts cannot name a role or key outside them.
//! Every refusal is a typed `ConfigError` naming the field, found before any
//! network call.
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use keyfold_aws::{AwsKmsWrapper, AwsWrapperFactory, check_kms_endpoint};
use keyfold_core::config::{AwsConfig, ConfigError, ProviderConfig};
use keyfold_core::probe::WrapperFactory;
use keyfold_core::{WrapError, WrapErrorKind, WrapOperation};

const KEY_ARN: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
const ROLE: &str = "arn:aws:iam::111122223333:role/keyfold";

fn tenant(key_ref: &str, role_arn: &str) -> AwsConfig {
    AwsConfig {
        kms_key_ref: key_ref.into(),
        region: "eu-west-1".into(),
        role_arn: role_arn.into(),
        external_id: Some("tenant-a".into()),
        endpoint_url: None,
    }
}

/// The `ConfigError` behind a build refusal.
fn config_error(err: &WrapError) -> &ConfigError {
    assert_eq!(err.kind, WrapErrorKind::Misconfigured, "{err}");
    assert_eq!(err.operation, WrapOperation::Configure, "{err}");
    err.source
        .as_deref()
        .and_then(|s| s.downcast_ref::<ConfigError>())
        .unwrap_or_else(|| panic!("no ConfigError behind {err:?}"))
}

fn field_of(err: &ConfigError) -> &'static str {
    match err {
        ConfigError::InvalidField { field, .. } => field,
        other => panic!("not an InvalidField: {other:?}"),
    }
}

/// Hostile endpoint overrides: each refused, with or without the loopback
/// switch unless it says otherwise.
const HOSTILE_ENDPOINTS: &[(&str, &str)] = &[
    ("https://169.254.169.254", "link-local metadata service"),
    (
        "http://169.254.169.254/latest/meta-data/",
        "link-local, http",
    ),
    ("https://[fd00:ec2::254]", "IPv6 metadata service"),
    ("https://10.0.0.5", "private address"),
    ("https://192.168.1.1:8443", "private address with port"),
    ("https://172.16.0.1", "private address"),
    ("https://0.0.0.0", "unspecified address"),
    ("https://[::ffff:127.0.0.1]", "IPv4-mapped loopback"),
    ("https://2130706433", "decimal IPv4"),
    ("https://127.1", "short IPv4"),
    ("https://kms.internal.example", "another host"),
    (
        "https://kms.eu-west-1.amazonaws.com.evil.example",
        "suffix trick",
    ),
    (
        "https://evil.example/kms.eu-west-1.amazonaws.com",
        "path trick",
    ),
    (
        "https://kms.eu-west-1.amazonaws.com@evil.example",
        "userinfo trick",
    ),
    (
        "https://evil.example@kms.eu-west-1.amazonaws.com",
        "userinfo",
    ),
    (
        "https://kms.eu-west-1.amazonaws.com:443@evil.example",
        "port-like userinfo",
    ),
    ("https://kms.eu-west-1.amazonaws.com.", "trailing dot"),
    ("https://evil.example.", "trailing dot, another host"),
    (
        "https://kms.eu-west-1.amazonaws.com%2eevil.example",
        "percent-encoding",
    ),
    (
        "https://kms.eu-west-1.amаzonaws.com",
        "IDN homograph (Cyrillic a)",
    ),
    (
        "https://xn--kms-eu-west-1-amazonaws-com.example",
        "punycode",
    ),
    ("https://kms.us-east-1.amazonaws.com", "another region"),
    ("https://kms.eu-west-1.amazonaws.com:8443", "another port"),
    ("https://kms.eu-west-1.amazonaws.com/prefix", "a path"),
    ("https://kms.eu-west-1.amazonaws.com?x=1", "a query"),
    ("http://kms.eu-west-1.amazonaws.com", "plain http"),
    ("kms.eu-west-1.amazonaws.com", "no scheme"),
    ("ftp://kms.eu-west-1.amazonaws.com", "another scheme"),
    (
        "https://vpce-.kms.eu-west-1.vpce.amazonaws.com",
        "empty VPC endpoint id",
    ),
    (
        "https://x.kms.eu-west-1.vpce.amazonaws.com",
        "not a VPC endpoint name",
    ),
    ("file:///etc/passwd", "a path"),
    ("$AWS_SECRET_ACCESS_KEY", "an environment variable name"),
];

/// Loopback endpoints: refused unless the operator's test switch is on.
const LOOPBACK: &[&str] = &[
    "http://127.0.0.1:4566",
    "http://localhost:4566",
    "http://[::1]:4566",
    "https://127.0.0.1",
    "http://127.0.0.2",
];

const ACCEPTED: &[&str] = &[
    "https://kms.eu-west-1.amazonaws.com",
    "https://kms.eu-west-1.amazonaws.com/",
    "https://kms.eu-west-1.amazonaws.com:443",
    "https://KMS.eu-west-1.amazonaws.com",
    "https://kms-fips.eu-west-1.amazonaws.com",
    "https://kms.eu-west-1.api.aws",
    "https://kms-fips.eu-west-1.api.aws",
    "https://vpce-0a1b2c3d4e5f6a7b8-abcdefgh.kms.eu-west-1.vpce.amazonaws.com",
    "https://vpce-0a1b2c3d4e5f6a7b8-abcdefgh-eu-west-1a.kms.eu-west-1.vpce.amazonaws.com",
];

#[test]
fn the_endpoint_check_accepts_kms_hosts_only() {
    for url in ACCEPTED {
        check_kms_endpoint(url, "eu-west-1", false).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    for (url, what) in HOSTILE_ENDPOINTS {
        for allow_loopback in [false, true] {
            let err = check_kms_endpoint(url, "eu-west-1", allow_loopback)
                .expect_err(&format!("{what}: {url} accepted"));
            assert_eq!(field_of(&err), "endpoint_url", "{what}: {err}");
        }
    }
    for url in LOOPBACK {
        let err = check_kms_endpoint(url, "eu-west-1", false).unwrap_err();
        assert!(err.to_string().contains("loopback"), "{url}: {err}");
        check_kms_endpoint(url, "eu-west-1", true).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    check_kms_endpoint(
        "https://kms.cn-north-1.amazonaws.com.cn",
        "cn-north-1",
        false,
    )
    .unwrap();
}

#[tokio::test]
async fn the_factory_refuses_hostile_operator_endpoints_before_any_call() {
    let config = ProviderConfig::Aws(tenant(KEY_ARN, ROLE));
    for (url, what) in HOSTILE_ENDPOINTS {
        let factory = AwsWrapperFactory::new()
            .kms_endpoint_url(*url)
            .allow_loopback_endpoints_for_tests(true);
        let err = factory.build(&config).await.unwrap_err();
        assert_eq!(field_of(config_error(&err)), "endpoint_url", "{what}");
    }
    for url in LOOPBACK {
        let err = AwsWrapperFactory::new()
            .kms_endpoint_url(*url)
            .build(&config)
            .await
            .unwrap_err();
        assert_eq!(field_of(config_error(&err)), "endpoint_url", "{url}");
    }
    for url in ACCEPTED {
        AwsWrapperFactory::new()
            .kms_endpoint_url(*url)
            .build(&config)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[tokio::test]
async fn a_tenant_config_cannot_name_an_endpoint() {
    // Even one the operator would accept: where requests go is not the
    // tenant's to say.
    for url in [
        "https://kms.eu-west-1.amazonaws.com",
        "http://127.0.0.1:4566",
        "https://169.254.169.254",
    ] {
        let mut config = tenant(KEY_ARN, ROLE);
        config.endpoint_url = Some(url.into());
        let factory = AwsWrapperFactory::new().allow_loopback_endpoints_for_tests(true);
        let err = factory
            .build(&ProviderConfig::Aws(config.clone()))
            .await
            .unwrap_err();
        let inner = config_error(&err);
        assert_eq!(field_of(inner), "endpoint_url", "{url}");
        assert!(inner.to_string().contains("operator-only"), "{inner}");
        // The builder refuses it too.
        let err = AwsKmsWrapper::builder(config).build().await.unwrap_err();
        assert_eq!(field_of(config_error(&err)), "endpoint_url");
    }
}

#[tokio::test]
async fn a_pinned_tenant_cannot_name_another_account() {
    let pinned = AwsWrapperFactory::new().allowed_accounts(["111122223333"]);
    let other_role = "arn:aws:iam::999988887777:role/keyfold";
    let other_key = "arn:aws:kms:eu-west-1:999988887777:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let other_alias = "arn:aws:kms:eu-west-1:999988887777:alias/tenant-b";
    for (config, field) in [
        (tenant(KEY_ARN, other_role), "role_arn"),
        (tenant("alias/tenant-a", other_role), "role_arn"),
        (tenant(other_key, ROLE), "kms_key_ref"),
        (tenant(other_alias, ROLE), "kms_key_ref"),
    ] {
        let err = pinned
            .build(&ProviderConfig::Aws(config.clone()))
            .await
            .unwrap_err();
        let inner = config_error(&err);
        assert_eq!(field_of(inner), field, "{config:?}");
        assert!(inner.to_string().contains("999988887777"), "{inner}");
    }
    for key_ref in [
        KEY_ARN,
        "alias/tenant-a",
        "arn:aws:kms:eu-west-1:111122223333:alias/tenant-a",
    ] {
        pinned
            .build(&ProviderConfig::Aws(tenant(key_ref, ROLE)))
            .await
            .unwrap_or_else(|e| panic!("{key_ref}: {e}"));
    }
    // Several accounts may be allowed; a malformed pin is refused.
    AwsWrapperFactory::new()
        .allowed_accounts(["999988887777", "111122223333"])
        .build(&ProviderConfig::Aws(tenant(other_key, ROLE)))
        .await
        .unwrap();
    let err = AwsWrapperFactory::new()
        .allowed_accounts(["1111"])
        .build(&ProviderConfig::Aws(tenant(KEY_ARN, ROLE)))
        .await
        .unwrap_err();
    assert_eq!(field_of(config_error(&err)), "allowed_accounts");
}

#[test]
fn the_factory_debug_shows_the_operator_settings() {
    let f = AwsWrapperFactory::new()
        .kms_endpoint_url("https://kms.eu-west-1.amazonaws.com")
        .allowed_accounts(["111122223333"]);
    let shown = format!("{f:?}");
    assert!(
        shown.contains("kms.eu-west-1.amazonaws.com") && shown.contains("111122223333"),
        "{shown}"
    );
}

/// The STS endpoint override receives the base credentials' signed
/// `AssumeRole` calls: it is held to STS hosts as the KMS one is to KMS hosts.
#[tokio::test]
async fn the_factory_refuses_sts_endpoints_that_are_not_aws_sts_hosts() {
    let config = ProviderConfig::Aws(tenant(KEY_ARN, ROLE));
    for (url, _what) in HOSTILE_ENDPOINTS {
        refused_sts(&config, url, true).await;
    }
    for url in [
        // A KMS host is not an STS host.
        "https://kms.eu-west-1.amazonaws.com",
        "https://sts.eu-west-1.amazonaws.com.evil.example",
        "https://vpce-.sts.eu-west-1.vpce.amazonaws.com",
    ] {
        refused_sts(&config, url, false).await;
    }
    for url in LOOPBACK {
        refused_sts(&config, url, false).await;
    }
    for url in [
        "https://sts.amazonaws.com",
        "https://sts.eu-west-1.amazonaws.com",
        "https://sts-fips.eu-west-1.amazonaws.com",
        "https://sts.eu-west-1.api.aws",
        "https://vpce-0a1b2c3d4e5f6a7b8-abcdefgh.sts.eu-west-1.vpce.amazonaws.com",
    ] {
        AwsWrapperFactory::new()
            .sts_endpoint_url(url)
            .build(&config)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    for url in LOOPBACK {
        AwsWrapperFactory::new()
            .sts_endpoint_url(*url)
            .allow_loopback_endpoints_for_tests(true)
            .build(&config)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

/// Builds with `url` as the STS endpoint and expects a refusal naming it.
async fn refused_sts(config: &ProviderConfig, url: &str, allow_loopback: bool) {
    let err = AwsWrapperFactory::new()
        .sts_endpoint_url(url)
        .allow_loopback_endpoints_for_tests(allow_loopback)
        .build(config)
        .await
        .expect_err(&format!("STS endpoint {url} accepted"));
    assert_eq!(field_of(config_error(&err)), "sts_endpoint_url", "{url}");
}
