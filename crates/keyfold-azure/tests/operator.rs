//! Tenant and operator settings (docs/THREAT_MODEL.md, "Tenant and operator
//! settings"): a tenant config cannot name the endpoint or a secret variable
//! or pick another identity of the host; the operator's endpoint must be the
//! key's own vault (loopback only behind the test switch); a pinned tenant
//! cannot name another Entra tenant or vault. Every refusal is a typed
//! `ConfigError` naming the field, found before any network call.
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use keyfold_azure::{AzureFactory, AzureIdentity, AzureKeyWrapper, check_vault_endpoint};
use keyfold_core::config::{AzureConfig, AzureKeyRef, ConfigError, ProviderConfig};
use keyfold_core::probe::WrapperFactory;
use keyfold_core::{WrapError, WrapErrorKind, WrapOperation};

const KEY: &str = "https://acme-keys.vault.azure.net/keys/tenant-a";
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const OTHER_TENANT: &str = "11111111-1111-1111-1111-111111111111";
const CLIENT_ID: &str = "00000000-0000-0000-0000-0000000000c1";

fn tenant() -> AzureConfig {
    serde_json::from_value(serde_json::json!({
        "kms_key_ref": KEY,
        "vault_url": "https://acme-keys.vault.azure.net",
        "azure_tenant_id": TENANT,
    }))
    .unwrap()
}

fn no_env(_: &str) -> Option<String> {
    None
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
    ("https://169.254.169.254", "link-local metadata service"),
    (
        "http://169.254.169.254/metadata/identity/oauth2/token",
        "IMDS token path",
    ),
    ("https://10.0.0.5", "private address"),
    ("https://192.168.0.1:8443", "private address"),
    ("https://[fd00::1]", "IPv6 private"),
    ("https://0.0.0.0", "unspecified address"),
    ("https://[::ffff:127.0.0.1]", "IPv4-mapped loopback"),
    ("https://2130706433", "decimal IPv4"),
    ("https://other.vault.azure.net", "another vault"),
    ("https://other.managedhsm.azure.net", "another HSM"),
    (
        "https://acme-keys.vault.azure.net.evil.example",
        "suffix trick",
    ),
    (
        "https://evil.example/acme-keys.vault.azure.net",
        "path trick",
    ),
    (
        "https://acme-keys.vault.azure.net@evil.example",
        "userinfo trick",
    ),
    ("https://evil.example@acme-keys.vault.azure.net", "userinfo"),
    (
        "https://acme-keys.vault.azure.net:443@evil.example",
        "port-like userinfo",
    ),
    ("https://acme-keys.vault.azure.net.", "trailing dot"),
    ("https://localhost.", "trailing-dot localhost"),
    (
        "https://acme-keys.vault.azure.net%2eevil.example",
        "percent-encoding",
    ),
    (
        "https://acme-kеys.vault.azure.net",
        "IDN homograph (Cyrillic e)",
    ),
    ("https://xn--acme-keys-vault.example", "punycode"),
    ("https://acme-keys.vault.azure.net:8443", "another port"),
    ("https://acme-keys.vault.azure.net/keys", "a path"),
    ("http://acme-keys.vault.azure.net", "plain http"),
    ("acme-keys.vault.azure.net", "no scheme"),
    ("file:///etc/passwd", "a path"),
    ("AZURE_CLIENT_SECRET", "an environment variable name"),
];

const LOOPBACK: &[&str] = &[
    "https://localhost:8443",
    "https://127.0.0.1:8443",
    "https://[::1]:8443",
];

#[test]
fn the_endpoint_check_accepts_the_key_s_vault_only() {
    let key = AzureKeyRef::parse(KEY).unwrap();
    for url in [
        "https://acme-keys.vault.azure.net",
        "https://acme-keys.vault.azure.net/",
        "https://ACME-keys.vault.azure.net:443",
    ] {
        check_vault_endpoint(url, &key, false).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    let hsm = AzureKeyRef::parse("https://acme.managedhsm.azure.net/keys/k").unwrap();
    check_vault_endpoint("https://acme.managedhsm.azure.net", &hsm, false).unwrap();
    assert!(check_vault_endpoint("https://acme.vault.azure.net", &hsm, false).is_err());
    for (url, what) in HOSTILE_ENDPOINTS {
        for allow_loopback in [false, true] {
            let err = check_vault_endpoint(url, &key, allow_loopback)
                .expect_err(&format!("{what}: {url} accepted"));
            assert_eq!(field_of(&err), "endpoint_url", "{what}: {err}");
        }
    }
    for url in LOOPBACK {
        let err = check_vault_endpoint(url, &key, false).unwrap_err();
        assert!(err.to_string().contains("loopback"), "{url}: {err}");
        check_vault_endpoint(url, &key, true).unwrap();
    }
}

#[tokio::test]
async fn the_factory_refuses_hostile_operator_endpoints() {
    let config = ProviderConfig::Azure(tenant());
    for (url, what) in HOSTILE_ENDPOINTS {
        let factory = AzureFactory::with_builder(|b| b.environment(no_env))
            .endpoint_url(*url)
            .allow_loopback_endpoints_for_tests(true);
        let err = factory.build(&config).await.unwrap_err();
        assert_eq!(field_of(config_error(&err)), "endpoint_url", "{what}");
    }
    for url in LOOPBACK {
        let err = AzureFactory::with_builder(|b| b.environment(no_env))
            .endpoint_url(*url)
            .build(&config)
            .await
            .unwrap_err();
        assert_eq!(field_of(config_error(&err)), "endpoint_url", "{url}");
    }
}

#[test]
fn a_tenant_config_cannot_name_operator_settings() {
    let cases = [
        (
            AzureConfig {
                endpoint_url: Some("https://acme-keys.vault.azure.net".into()),
                ..tenant()
            },
            "endpoint_url",
        ),
        (
            AzureConfig {
                endpoint_url: Some("https://169.254.169.254".into()),
                ..tenant()
            },
            "endpoint_url",
        ),
        (
            AzureConfig {
                client_id: Some(CLIENT_ID.into()),
                client_secret_env_var: Some("DATABASE_PASSWORD".into()),
                ..tenant()
            },
            "client_secret_env_var",
        ),
    ];
    for (config, field) in cases {
        let err = AzureKeyWrapper::builder(&config)
            .environment(no_env)
            .build()
            .unwrap_err();
        let inner = config_error(&err);
        assert_eq!(field_of(inner), field);
        assert!(inner.to_string().contains("operator-only"), "{inner}");
    }
}

#[test]
fn a_secret_variable_error_does_not_tell_whether_it_exists() {
    // The operator's variable: the same words whether it is unset or empty,
    // and never its value.
    let identity = AzureIdentity::ClientSecret {
        client_id: CLIENT_ID.into(),
        env_var: "KEYFOLD_SECRET".into(),
    };
    let text = |value: Option<&'static str>| {
        AzureKeyWrapper::builder(&tenant())
            .identity(identity.clone())
            .environment(move |n| (n == "KEYFOLD_SECRET").then(|| value.map(str::to_owned))?)
            .build()
            .unwrap_err()
            .to_string()
    };
    assert_eq!(text(None), text(Some(" ")));
    assert!(text(None).contains("unset or empty"), "{}", text(None));
    // A bad variable name from the operator is refused as such.
    let err = AzureKeyWrapper::builder(&tenant())
        .identity(AzureIdentity::ClientSecret {
            client_id: CLIENT_ID.into(),
            env_var: "s3cr3t value".into(),
        })
        .environment(no_env)
        .build()
        .unwrap_err();
    assert_eq!(field_of(config_error(&err)), "client_secret_env_var");
    assert!(!err.to_string().contains("s3cr3t"), "{err}");
}

#[test]
fn a_tenant_cannot_pick_another_identity_of_the_host() {
    let other = "99999999-9999-9999-9999-999999999999";
    let with_client = |id: &str| AzureConfig {
        client_id: Some(id.into()),
        ..tenant()
    };
    let federated = |n: &str| match n {
        "AZURE_FEDERATED_TOKEN_FILE" => Some("/var/run/secrets/azure/tokens/token".to_owned()),
        "AZURE_CLIENT_ID" => Some(CLIENT_ID.to_owned()),
        _ => None,
    };
    // System-assigned managed identity: no client id may be named.
    // User-assigned, workload identity, client secret: only the operator's.
    let builders = [
        AzureKeyWrapper::builder(&with_client(CLIENT_ID)).environment(no_env),
        AzureKeyWrapper::builder(&with_client(other))
            .environment(no_env)
            .identity(AzureIdentity::ManagedIdentity {
                client_id: Some(CLIENT_ID.into()),
            }),
        AzureKeyWrapper::builder(&with_client(other)).environment(federated),
        AzureKeyWrapper::builder(&with_client(other))
            .environment(|_| Some("s3cr3t".to_owned()))
            .identity(AzureIdentity::ClientSecret {
                client_id: CLIENT_ID.into(),
                env_var: "KEYFOLD_SECRET".into(),
            }),
    ];
    for builder in builders {
        let err = builder.build().unwrap_err();
        assert_eq!(field_of(config_error(&err)), "client_id", "{err}");
    }
    // The operator's own client id is accepted, in any case.
    AzureKeyWrapper::builder(&with_client(&CLIENT_ID.to_ascii_uppercase()))
        .environment(no_env)
        .identity(AzureIdentity::ManagedIdentity {
            client_id: Some(CLIENT_ID.into()),
        })
        .build()
        .unwrap();
    // A client secret needs the tenant's directory.
    let err = AzureKeyWrapper::builder(&AzureConfig {
        azure_tenant_id: None,
        ..tenant()
    })
    .environment(|_| Some("s3cr3t".to_owned()))
    .identity(AzureIdentity::ClientSecret {
        client_id: CLIENT_ID.into(),
        env_var: "KEYFOLD_SECRET".into(),
    })
    .build()
    .unwrap_err();
    assert_eq!(field_of(config_error(&err)), "azure_tenant_id");
}

#[tokio::test]
async fn a_pinned_tenant_cannot_name_another_directory_or_vault() {
    let secret = AzureIdentity::ClientSecret {
        client_id: CLIENT_ID.into(),
        env_var: "KEYFOLD_SECRET".into(),
    };
    let pinned = AzureFactory::with_builder(|b| b.environment(|_| Some("s3cr3t".to_owned())))
        .identity(secret)
        .allowed_tenant_ids([TENANT])
        .allowed_vaults(["https://acme-keys.vault.azure.net"]);
    pinned
        .build(&ProviderConfig::Azure(tenant()))
        .await
        .unwrap();
    let other_directory = AzureConfig {
        azure_tenant_id: Some(OTHER_TENANT.into()),
        ..tenant()
    };
    let other_vault: AzureConfig = serde_json::from_value(serde_json::json!({
        "kms_key_ref": "https://victim.vault.azure.net/keys/k",
        "vault_url": "https://victim.vault.azure.net",
        "azure_tenant_id": TENANT,
    }))
    .unwrap();
    for (config, field) in [
        (other_directory, "azure_tenant_id"),
        (other_vault, "kms_key_ref"),
    ] {
        let err = pinned
            .build(&ProviderConfig::Azure(config))
            .await
            .unwrap_err();
        assert_eq!(field_of(config_error(&err)), field, "{err}");
    }
    // Workload identity's directory from the environment is pinned too.
    let workload = AzureFactory::with_builder(|b| {
        b.environment(|n| match n {
            "AZURE_FEDERATED_TOKEN_FILE" => Some("/var/run/secrets/azure/tokens/token".to_owned()),
            "AZURE_CLIENT_ID" => Some(CLIENT_ID.to_owned()),
            "AZURE_TENANT_ID" => Some(OTHER_TENANT.to_owned()),
            _ => None,
        })
    })
    .allowed_tenant_ids([TENANT]);
    let err = workload
        .build(&ProviderConfig::Azure(AzureConfig {
            azure_tenant_id: None,
            ..tenant()
        }))
        .await
        .unwrap_err();
    assert_eq!(field_of(config_error(&err)), "azure_tenant_id", "{err}");
    let shown = format!("{pinned:?}");
    assert!(
        shown.contains(TENANT) && !shown.contains("s3cr3t"),
        "{shown}"
    );
}
