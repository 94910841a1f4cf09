//! From config to wrapper: every refusal, with its message checked.
#![allow(clippy::unwrap_used, reason = "tests")]

use keyfold_core::config::{ConfigError, GcpConfig, ProviderConfig};
use keyfold_core::{WrapErrorKind, WrapOperation};
use keyfold_gcp::{DEFAULT_ENDPOINT, GcpKmsWrapper};

const KEY: &str = "projects/acme/locations/europe-west1/keyRings/tenants/cryptoKeys/tenant-a";
const SA: &str = "keyfold@acme.iam.gserviceaccount.com";

fn parse(json: &str) -> Result<ProviderConfig, ConfigError> {
    serde_json::from_str::<ProviderConfig>(json).map_err(|e| ConfigError::Malformed(e.to_string()))
}

fn gcp(key: &str, sa: &str, endpoint: Option<&str>) -> GcpConfig {
    GcpConfig {
        kms_key_ref: key.to_owned(),
        impersonate_service_account: sa.to_owned(),
        project_id: None,
        endpoint_url: endpoint.map(str::to_owned),
    }
}

/// Builds `config` (inside a runtime) and returns the refusal's text.
async fn refusal(config: GcpConfig) -> String {
    let err = GcpKmsWrapper::builder(config).build().unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Misconfigured, "{err}");
    assert_eq!(err.operation, WrapOperation::Configure);
    assert_eq!(err.provider, "gcp");
    err.to_string()
}

#[tokio::test]
async fn a_valid_config_builds_without_network() {
    let config = parse(&format!(
        r#"{{"provider":"gcp","kms_key_ref":"{KEY}","impersonate_service_account":"{SA}","project_id":"acme-billing"}}"#
    ))
    .unwrap();
    let w = GcpKmsWrapper::from_provider_config(&config).unwrap();
    assert_eq!(keyfold_core::KeyWrapper::key_ref(&w), KEY);
    assert_eq!(keyfold_core::KeyWrapper::provider(&w), "gcp");
    assert_eq!(w.endpoint(), DEFAULT_ENDPOINT);
    assert_eq!(w.impersonate_service_account(), SA);
    assert_eq!(w.crypto_key().crypto_key, "tenant-a");
    let shown = format!("{w:?}");
    assert!(shown.contains("impersonating"), "{shown}");
    assert!(shown.contains("acme-billing"), "{shown}");
}

#[tokio::test]
async fn a_crypto_key_version_is_refused() {
    let versioned = format!("{KEY}/cryptoKeyVersions/3");
    let json = format!(
        r#"{{"provider":"gcp","kms_key_ref":"{versioned}","impersonate_service_account":"{SA}"}}"#
    );
    let err = parse(&json).unwrap_err().to_string();
    assert!(
        err.contains("drop the /cryptoKeyVersions/N suffix"),
        "{err}"
    );
    assert!(err.contains("primary version"), "{err}");
    let err = refusal(gcp(&versioned, SA, None)).await;
    assert!(
        err.contains("drop the /cryptoKeyVersions/N suffix"),
        "{err}"
    );
    assert!(err.contains(&versioned), "{err}");
}

#[tokio::test]
async fn a_malformed_key_name_is_refused() {
    for bad in [
        "tenant-a",
        "projects/acme/locations/europe-west1/keyRings/tenants",
        "projects/acme/locations/europe-west1/keyRings/tenants/cryptoKeys/",
        "projects/acme/locations/eu west/keyRings/tenants/cryptoKeys/k",
    ] {
        let err = refusal(gcp(bad, SA, None)).await;
        assert!(err.contains("invalid gcp key reference"), "{bad}: {err}");
    }
    let err = refusal(gcp("tenant-a", SA, None)).await;
    assert!(
        err.contains("expected projects/P/locations/L/keyRings/R/cryptoKeys/K"),
        "{err}"
    );
}

#[tokio::test]
async fn service_account_keys_are_refused_with_a_pointer_to_impersonation() {
    for field in [
        "credentials",
        "credentials_json",
        "service_account_key",
        "service_account_json",
        "private_key",
        "private_key_id",
    ] {
        let json = format!(
            r#"{{"provider":"gcp","kms_key_ref":"{KEY}","impersonate_service_account":"{SA}","{field}":"-----BEGIN PRIVATE KEY-----"}}"#
        );
        let err = parse(&json).unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
        assert!(err.contains("static credential"), "{field}: {err}");
        assert!(
            err.contains("impersonate_service_account"),
            "{field}: {err}"
        );
        assert!(
            !err.contains("BEGIN PRIVATE KEY"),
            "echoes the secret: {err}"
        );
    }
}

#[tokio::test]
async fn the_service_account_is_required_and_must_be_one() {
    let json = format!(r#"{{"provider":"gcp","kms_key_ref":"{KEY}"}}"#);
    let err = parse(&json).unwrap_err().to_string();
    assert!(err.contains("impersonate_service_account"), "{err}");

    for bad in [
        "",
        "keyfold",
        "keyfold@gmail.com",
        "@acme.iam.gserviceaccount.com",
    ] {
        let err = refusal(gcp(KEY, bad, None)).await;
        assert!(
            err.contains("expected a service account email, NAME@PROJECT.iam.gserviceaccount.com"),
            "{bad:?}: {err}"
        );
    }
}

#[tokio::test]
async fn the_endpoint_must_be_http_or_https() {
    let err = refusal(gcp(KEY, SA, Some("grpc://cloudkms.googleapis.com"))).await;
    assert!(err.contains("endpoint_url"), "{err}");
    assert!(err.contains("must be an https:// URL"), "{err}");
}

#[tokio::test]
async fn tokens_are_never_sent_over_plain_http_to_a_remote_host() {
    // Refused by the config's own validation (plain http only to loopback).
    let err = refusal(gcp(KEY, SA, Some("http://kms.internal.example:8080"))).await;
    assert!(err.contains("endpoint_url"), "{err}");
    assert!(
        err.contains("plain http:// is allowed only to a loopback host"),
        "{err}"
    );
    // A bearer token is usable anywhere: TLS is not enough, the host must be
    // Google's (or a loopback proxy), never one a tenant's config names.
    for bad in [
        "https://kms.evil.example",
        "https://evilgoogleapis.com",
        "https://googleapis.com.evil.example",
        "https://127.0.0.1:80@kms.evil.example",
    ] {
        let err = refusal(gcp(KEY, SA, Some(bad))).await;
        assert!(err.contains("endpoint_url"), "{bad}: {err}");
    }
    // As the operator's setting, a private endpoint over TLS is fine, and a
    // loopback proxy with the test switch on.
    for url in [
        "https://private.googleapis.com",
        "https://CloudKMS.googleapis.com.:443/",
    ] {
        GcpKmsWrapper::builder(gcp(KEY, SA, None))
            .endpoint_url(url)
            .build()
            .unwrap();
    }
    for url in ["http://127.0.0.1:9090", "https://127.0.0.1:8443"] {
        GcpKmsWrapper::builder(gcp(KEY, SA, None))
            .endpoint_url(url)
            .allow_loopback_endpoints_for_tests(true)
            .build()
            .unwrap();
    }
}

#[tokio::test]
async fn unknown_fields_are_refused() {
    let json = format!(
        r#"{{"provider":"gcp","kms_key_ref":"{KEY}","impersonate_service_account":"{SA}","region":"eu"}}"#
    );
    let err = parse(&json).unwrap_err().to_string();
    assert!(err.contains("unknown field `region`"), "{err}");
}

#[tokio::test]
async fn anonymous_credentials_only_reach_a_local_server() {
    for endpoint in [
        None,
        Some("https://cloudkms.googleapis.com"),
        Some("http://cloudkms.googleapis.com"),
        Some("https://127.0.0.1:8443"),
        Some("http://127.0.0.1.example.com:80"),
    ] {
        let mut builder = GcpKmsWrapper::builder(gcp(KEY, SA, None))
            .allow_loopback_endpoints_for_tests(true)
            .anonymous_credentials_for_local_server();
        if let Some(url) = endpoint {
            builder = builder.endpoint_url(url);
        }
        let err = builder.build().unwrap_err();
        assert_eq!(err.kind, WrapErrorKind::Misconfigured, "{endpoint:?}");
        let text = err.to_string();
        // A non-Google host is refused by the endpoint check before the
        // credentials are looked at.
        assert!(
            text.contains("anonymous credentials are only for a local test server")
                || text.contains("must be https:// to a Google API host"),
            "{endpoint:?}: {text}"
        );
    }
    GcpKmsWrapper::builder(gcp(KEY, SA, None))
        .endpoint_url("http://127.0.0.1:1")
        .allow_loopback_endpoints_for_tests(true)
        .anonymous_credentials_for_local_server()
        .build()
        .unwrap();
    // Without the operator's loopback switch, not even a local server.
    let err = GcpKmsWrapper::builder(gcp(KEY, SA, None))
        .endpoint_url("http://127.0.0.1:1")
        .anonymous_credentials_for_local_server()
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}

#[tokio::test]
async fn another_providers_config_is_refused() {
    let aws = parse(
        r#"{"provider":"aws","kms_key_ref":"alias/k","region":"eu-west-1",
            "role_arn":"arn:aws:iam::111122223333:role/keyfold","external_id":"tenant-a"}"#,
    )
    .unwrap();
    let err = GcpKmsWrapper::from_provider_config(&aws).unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Misconfigured);
    assert!(
        err.to_string()
            .contains("the config is for provider \"aws\"; a Cloud KMS wrapper needs a gcp config"),
        "{err}"
    );
}

#[test]
fn building_outside_a_tokio_runtime_is_an_error_not_a_panic() {
    let err = GcpKmsWrapper::builder(gcp(KEY, SA, None))
        .endpoint_url("http://127.0.0.1:1")
        .allow_loopback_endpoints_for_tests(true)
        .anonymous_credentials_for_local_server()
        .build()
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Misconfigured);
    assert!(err.to_string().contains("inside a Tokio runtime"), "{err}");
}
