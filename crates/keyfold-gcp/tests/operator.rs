//! Tenant and operator settings (docs/THREAT_MODEL.md, "Tenant and operator
//! settings"): a tenant config cannot name the endpoint; the operator's must
//! be a Google API host (loopback only behind the test switch). Every
//! refusal is a typed `ConfigError` naming the field, found before any call.
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use keyfold_core::config::{ConfigError, GcpConfig, ProviderConfig};
use keyfold_core::probe::WrapperFactory;
use keyfold_core::{WrapError, WrapErrorKind, WrapOperation};
use keyfold_gcp::{GcpKmsWrapper, GcpWrapperFactory, check_google_endpoint};

const KEY: &str = "projects/acme/locations/europe-west1/keyRings/tenants/cryptoKeys/tenant-a";
const SA: &str = "keyfold@acme.iam.gserviceaccount.com";

fn tenant() -> GcpConfig {
    GcpConfig {
        kms_key_ref: KEY.into(),
        impersonate_service_account: SA.into(),
        project_id: None,
        endpoint_url: None,
    }
}

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

const HOSTILE_ENDPOINTS: &[(&str, &str)] = &[
    ("https://169.254.169.254", "link-local metadata server"),
    ("http://metadata.google.internal", "metadata server by name"),
    ("https://10.0.0.5", "private address"),
    ("https://[fd20::1]", "IPv6 private"),
    ("https://0.0.0.0", "unspecified address"),
    ("https://[::ffff:127.0.0.1]", "IPv4-mapped loopback"),
    ("https://2130706433", "decimal IPv4"),
    ("https://kms.evil.example", "another host"),
    ("https://evilgoogleapis.com", "suffix without a dot"),
    ("https://googleapis.com.evil.example", "suffix trick"),
    (
        "https://evil.example./cloudkms.googleapis.com",
        "path trick",
    ),
    (
        "https://cloudkms.googleapis.com@evil.example",
        "userinfo trick",
    ),
    ("https://evil.example@cloudkms.googleapis.com", "userinfo"),
    ("https://127.0.0.1:80@evil.example", "port-like userinfo"),
    ("https://evil.example.", "trailing dot, another host"),
    ("https://googleapis.com..", "two trailing dots"),
    ("https://.googleapis.com", "empty label"),
    ("https://localhost.", "trailing-dot localhost"),
    (
        "https://cloudkms.googleapis.com%2eevil.example",
        "percent-encoding",
    ),
    (
        "https://cloudkms.googleаpis.com",
        "IDN homograph (Cyrillic a)",
    ),
    ("https://xn--googleapis-xyz.com", "punycode"),
    ("http://cloudkms.googleapis.com", "plain http"),
    ("https://cloudkms.googleapis.com/v1", "a path"),
    ("grpc://cloudkms.googleapis.com", "another scheme"),
    ("file:///etc/passwd", "a path"),
    (
        "GOOGLE_APPLICATION_CREDENTIALS",
        "an environment variable name",
    ),
];

const LOOPBACK: &[&str] = &[
    "http://127.0.0.1:9090",
    "http://localhost:1",
    "http://[::1]:9",
];

#[test]
fn the_endpoint_check_accepts_google_hosts_only() {
    for url in [
        "https://cloudkms.googleapis.com",
        "https://cloudkms.googleapis.com/",
        "https://private.googleapis.com",
        "https://restricted.googleapis.com:443",
        "https://cloudkms-myendpoint.p.googleapis.com",
        "https://cloudkms.europe-west1.rep.googleapis.com",
        "https://CloudKMS.googleapis.com.",
    ] {
        check_google_endpoint(url, false).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    for (url, what) in HOSTILE_ENDPOINTS {
        for allow_loopback in [false, true] {
            let err = check_google_endpoint(url, allow_loopback)
                .expect_err(&format!("{what}: {url} accepted"));
            assert_eq!(field_of(&err), "endpoint_url", "{what}: {err}");
        }
    }
    for url in LOOPBACK {
        let err = check_google_endpoint(url, false).unwrap_err();
        assert!(err.to_string().contains("loopback"), "{url}: {err}");
        check_google_endpoint(url, true).unwrap();
    }
}

#[tokio::test]
async fn the_factory_refuses_hostile_operator_endpoints() {
    let config = ProviderConfig::Gcp(tenant());
    for (url, what) in HOSTILE_ENDPOINTS {
        let factory = GcpWrapperFactory::new()
            .endpoint_url(*url)
            .allow_loopback_endpoints_for_tests(true);
        let err = factory.build(&config).await.unwrap_err();
        assert_eq!(field_of(config_error(&err)), "endpoint_url", "{what}");
    }
    for url in LOOPBACK {
        let err = GcpWrapperFactory::new()
            .endpoint_url(*url)
            .build(&config)
            .await
            .unwrap_err();
        assert_eq!(field_of(config_error(&err)), "endpoint_url", "{url}");
    }
}

#[tokio::test]
async fn a_tenant_config_cannot_name_an_endpoint() {
    for url in ["https://private.googleapis.com", "http://127.0.0.1:9090"] {
        let config = GcpConfig {
            endpoint_url: Some(url.into()),
            ..tenant()
        };
        let factory = GcpWrapperFactory::new().allow_loopback_endpoints_for_tests(true);
        let err = factory
            .build(&ProviderConfig::Gcp(config.clone()))
            .await
            .unwrap_err();
        let inner = config_error(&err);
        assert_eq!(field_of(inner), "endpoint_url", "{url}");
        assert!(inner.to_string().contains("operator-only"), "{inner}");
        let err = GcpKmsWrapper::builder(config).build().unwrap_err();
        assert_eq!(field_of(config_error(&err)), "endpoint_url");
    }
}

#[tokio::test]
async fn a_pinned_tenant_cannot_impersonate_another_service_account() {
    let pinned = GcpWrapperFactory::new().allowed_service_accounts([SA]);
    pinned.build(&ProviderConfig::Gcp(tenant())).await.unwrap();
    let other = GcpConfig {
        impersonate_service_account: "keyfold@victim.iam.gserviceaccount.com".into(),
        ..tenant()
    };
    let err = pinned.build(&ProviderConfig::Gcp(other)).await.unwrap_err();
    let inner = config_error(&err);
    assert_eq!(field_of(inner), "impersonate_service_account");
    assert!(inner.to_string().contains("victim"), "{inner}");
}
