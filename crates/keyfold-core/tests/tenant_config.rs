//! Tenant configs (docs/THREAT_MODEL.md, "Tenant and operator settings"): a
//! table of hostile tenant configs, each refused with a typed `ConfigError`
//! naming the field, whatever the value (internal and link-local addresses,
//! userinfo tricks, IDN and trailing-dot hosts, loopback, environment
//! variable names, paths); the tenant forms of every provider accepted.
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use keyfold_core::config::{
    ConfigError, LocalConfig, OPERATOR_ONLY_FIELDS, ProviderConfig, TenantConfig,
};
use serde_json::{Value, json};

fn aws() -> Value {
    json!({
        "provider": "aws",
        "kms_key_ref": "arn:aws:kms:eu-west-1:111122223333:alias/tenant-a",
        "region": "eu-west-1",
        "role_arn": "arn:aws:iam::111122223333:role/keyfold",
        "external_id": "tenant-a"
    })
}

fn gcp() -> Value {
    json!({
        "provider": "gcp",
        "kms_key_ref": "projects/acme/locations/europe-west1/keyRings/r/cryptoKeys/k",
        "impersonate_service_account": "keyfold@acme.iam.gserviceaccount.com"
    })
}

fn azure() -> Value {
    json!({
        "provider": "azure",
        "kms_key_ref": "https://acme.vault.azure.net/keys/tenant-a",
        "vault_url": "https://acme.vault.azure.net",
        "azure_tenant_id": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "client_id": "00000000-0000-0000-0000-0000000000c1"
    })
}

fn local() -> Value {
    json!({"provider": "local", "kms_key_ref": "dev-kek"})
}

fn with(mut v: Value, field: &str, value: &str) -> Value {
    v[field] = json!(value);
    v
}

fn tenant(v: &Value) -> Result<TenantConfig, ConfigError> {
    TenantConfig::try_from(v.clone())
}

/// Values a hostile tenant might put in an operator-only field.
const HOSTILE_VALUES: &[&str] = &[
    "https://169.254.169.254",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://10.0.0.5",
    "https://192.168.1.1:8443",
    "https://[fd00:ec2::254]",
    "http://127.0.0.1:2019",
    "http://localhost:6443",
    "https://kms.eu-west-1.amazonaws.com@evil.example",
    "https://127.0.0.1:80@evil.example",
    "https://evil.example.",
    "https://kms.eu-west-1.amazonaws.com.",
    "https://acme.vault.azure.net.evil.example",
    "https://acme.vаult.azure.net",
    "https://xn--80ak6aa92e.com",
    "AWS_SECRET_ACCESS_KEY",
    "DATABASE_URL",
    "/etc/shadow",
    "../../../../proc/self/environ",
    "/var/run/secrets/kubernetes.io/serviceaccount/token",
    // Even the provider's own host and an empty value: the field is refused,
    // not its value.
    "https://kms.eu-west-1.amazonaws.com",
    "",
];

#[test]
fn every_operator_only_field_is_refused_whatever_its_value() {
    let bases = [
        ("local", local()),
        ("aws", aws()),
        ("gcp", gcp()),
        ("azure", azure()),
    ];
    let mut cases = 0;
    for (provider, base) in &bases {
        let fields = OPERATOR_ONLY_FIELDS
            .iter()
            .find(|(p, _)| p == provider)
            .map(|(_, f)| *f)
            .unwrap();
        assert!(!fields.is_empty(), "{provider}");
        for field in fields {
            for value in HOSTILE_VALUES {
                let v = with(base.clone(), field, value);
                let err = tenant(&v).unwrap_err();
                assert_eq!(
                    err,
                    ConfigError::OperatorOnly {
                        provider: match *provider {
                            "local" => "local",
                            "aws" => "aws",
                            "gcp" => "gcp",
                            _ => "azure",
                        },
                        field,
                    },
                    "{v}"
                );
                let text = err.to_string();
                assert!(
                    text.contains(&format!("`{field}` is an operator setting")),
                    "{text}"
                );
                // The error never echoes the value.
                if !value.is_empty() {
                    assert!(!text.contains(value), "{text}");
                }
                // Through serde, as a request body is read.
                let err = serde_json::from_value::<TenantConfig>(v).unwrap_err();
                assert!(err.to_string().contains(field), "{err}");
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 6 * HOSTILE_VALUES.len());
}

#[test]
fn tenant_forms_are_accepted_and_round_trip() {
    for v in [local(), aws(), gcp(), azure()] {
        let t = tenant(&v).unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_eq!(serde_json::to_value(&t).unwrap(), v);
        assert_eq!(t.provider(), v["provider"]);
        assert_eq!(t.kms_key_ref(), v["kms_key_ref"]);
        let back: TenantConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, t);
        back.as_provider_config().check_tenant().unwrap();
    }
}

#[test]
fn static_credentials_and_unknown_fields_are_still_refused() {
    let err = tenant(&with(aws(), "secret_access_key", "wJalrXUtnFEMI")).unwrap_err();
    assert!(
        matches!(err, ConfigError::StaticCredentials { .. }),
        "{err}"
    );
    assert!(!err.to_string().contains("wJalrXUtnFEMI"), "{err}");
    let err = tenant(&with(gcp(), "region", "eu")).unwrap_err();
    assert!(matches!(err, ConfigError::Malformed(_)), "{err}");
    assert!(err.to_string().contains("unknown field `region`"), "{err}");
    // Bad values of the tenant's own fields are still checked.
    let err = tenant(&with(aws(), "role_arn", "arn:aws:iam::111122223333:user/x")).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::InvalidField {
                field: "role_arn",
                ..
            }
        ),
        "{err}"
    );
    let err = tenant(&with(local(), "kms_key_ref", "")).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::InvalidField {
                field: "kms_key_ref",
                ..
            }
        ),
        "{err}"
    );
    let err = tenant(&json!({"provider": "vault", "kms_key_ref": "x"})).unwrap_err();
    assert!(matches!(err, ConfigError::Malformed(_)), "{err}");
}

#[test]
fn an_operator_config_converts_only_without_operator_fields() {
    let operator = ProviderConfig::Local(LocalConfig {
        kms_key_ref: "dev-kek".into(),
        kek_env_var: None,
        kek_file: Some("/etc/keyfold/kek.hex".into()),
    });
    operator.validate().unwrap();
    assert_eq!(operator.operator_fields(), ["kek_file"]);
    assert_eq!(
        TenantConfig::try_from(operator.clone()).unwrap_err(),
        ConfigError::OperatorOnly {
            provider: "local",
            field: "kek_file"
        }
    );
    // The operator's own config (a CLI's file) still reads as a ProviderConfig.
    let parsed: ProviderConfig = serde_json::from_value(
        json!({"provider": "local", "kms_key_ref": "dev-kek", "kek_file": "/etc/keyfold/kek.hex"}),
    )
    .unwrap();
    assert_eq!(parsed, operator);
    let tenant_side: ProviderConfig = tenant(&aws()).unwrap().into();
    assert!(tenant_side.operator_fields().is_empty());
    TenantConfig::try_from(tenant_side).unwrap();
}

#[tokio::test]
async fn local_keks_serve_tenant_configs_by_id_only() {
    use keyfold_core::probe::{LocalKeks, ProbeStep, WrapperFactory, probe_config};
    let dir = std::env::temp_dir().join(format!("keyfold-local-keks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kek.hex");
    std::fs::write(&file, hex::encode([9u8; 32])).unwrap();
    let keks = LocalKeks::new().file("dev-kek", &file);
    assert_eq!(keks.ids().collect::<Vec<_>>(), ["dev-kek"]);

    // The tenant names the id; the operator's file is read and probed.
    let t = tenant(&local()).unwrap();
    let wrapper = probe_config(&t, &keks).await.unwrap();
    assert_eq!(wrapper.key_ref(), "dev-kek");

    // Another id: refused without reading anything.
    let other = tenant(&with(local(), "kms_key_ref", "prod-kek")).unwrap();
    let failure = probe_config(&other, &keks).await.unwrap_err();
    assert_eq!(failure.step, ProbeStep::Build);
    assert!(failure.message.contains("no local KEK"), "{failure}");

    // A config naming a source (it did not come through TenantConfig) is
    // refused by the factory with the typed error.
    for (field, config) in [
        (
            "kek_file",
            LocalConfig {
                kms_key_ref: "dev-kek".into(),
                kek_env_var: None,
                kek_file: Some("/etc/shadow".into()),
            },
        ),
        (
            "kek_env_var",
            LocalConfig {
                kms_key_ref: "dev-kek".into(),
                kek_env_var: Some("AWS_SECRET_ACCESS_KEY".into()),
                kek_file: None,
            },
        ),
    ] {
        let err = keks
            .build(&ProviderConfig::Local(config))
            .await
            .unwrap_err();
        let source = err
            .source
            .as_deref()
            .and_then(|s| s.downcast_ref::<ConfigError>());
        assert_eq!(
            source,
            Some(&ConfigError::OperatorOnly {
                provider: "local",
                field
            }),
            "{err}"
        );
        assert!(!err.to_string().contains("shadow"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
