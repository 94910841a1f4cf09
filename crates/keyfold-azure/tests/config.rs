//! Config to wrapper: every refusal with its message, the credential chosen
//! by default (managed identity, workload identity, client secret from the
//! named variable), the secret and workload token actually reaching Entra
//! ID's token endpoint, and `Debug` showing no secret.

mod support;

use std::sync::Arc;

use keyfold_azure::{AzureIdentity, AzureKeyWrapper, CredentialSource};
use keyfold_core::config::{AzureConfig, ConfigError, ProviderConfig};
use keyfold_core::{KeyWrapper, SecretKey, WrapContext, WrapErrorKind, WrapOperation};
use serde_json::json;
use support::{FakeVault, SCOPE, TENANT};

const CLIENT_ID: &str = "00000000-0000-0000-0000-0000000000c1";
const SECRET: &str = "s3cr3t~Value.With_Symbols+&=";

fn cfg(value: serde_json::Value) -> AzureConfig {
    serde_json::from_value(value).unwrap()
}

fn base() -> AzureConfig {
    cfg(json!({
        "kms_key_ref": "https://acme-keys.vault.azure.net/keys/tenant-a",
        "vault_url": "https://acme-keys.vault.azure.net",
    }))
}

fn no_env(_: &str) -> Option<String> {
    None
}

/// The operator's client secret identity, read from `var`.
fn secret_identity(var: &str) -> AzureIdentity {
    AzureIdentity::ClientSecret {
        client_id: CLIENT_ID.into(),
        env_var: var.into(),
    }
}

/// Builds with an empty environment; returns the error's text.
fn refusal(config: AzureConfig) -> String {
    refusal_with(AzureKeyWrapper::builder(&config).environment(no_env))
}

fn refusal_with(builder: keyfold_azure::AzureKeyWrapperBuilder) -> String {
    let err = builder.build().unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Misconfigured, "{err}");
    assert_eq!(err.operation, WrapOperation::Configure);
    assert_eq!(err.provider, "azure");
    err.to_string()
}

#[test]
fn every_config_refusal_says_why() {
    let with = |f: &dyn Fn(&mut AzureConfig)| {
        let mut c = base();
        f(&mut c);
        refusal(c)
    };
    let cases: Vec<(String, &str)> = vec![
        (
            with(&|c| c.kms_key_ref = "https://keys.example.com/keys/tenant-a".into()),
            "host must be VAULT.vault.azure.net or HSM.managedhsm.azure.net",
        ),
        (
            with(&|c| c.kms_key_ref = "http://acme-keys.vault.azure.net/keys/tenant-a".into()),
            "must start with https://",
        ),
        (
            with(&|c| c.kms_key_ref = "https://acme-keys.vault.azure.net/secrets/tenant-a".into()),
            "expected https://VAULT.vault.azure.net/keys/NAME[/VERSION]",
        ),
        (
            with(&|c| c.kms_key_ref = "https://acme-keys.vault.azure.net/keys/tenant-a/v1".into()),
            "version (32 hex digits)",
        ),
        (
            with(&|c| c.vault_url = "https://other.vault.azure.net".into()),
            "https://other.vault.azure.net is not the key's vault https://acme-keys.vault.azure.net",
        ),
        (
            with(&|c| {
                c.azure_tenant_id = Some(TENANT.into());
                c.client_id = Some(CLIENT_ID.into());
                c.client_secret_env_var = Some(SECRET.into());
            }),
            "give the NAME of an environment variable (A-Z, 0-9, _), never the secret itself",
        ),
        (
            with(&|c| c.client_secret_env_var = Some("KV_SECRET".into())),
            "a client secret needs `azure_tenant_id` and `client_id`",
        ),
        (
            with(&|c| c.endpoint_url = Some("ftp://localhost:1".into())),
            "endpoint_url`: must be an https:// URL",
        ),
        (
            with(&|c| c.endpoint_url = Some("http://localhost:8443".into())),
            "`endpoint_url`: an operator-only setting",
        ),
        (
            with(&|c| {
                c.azure_tenant_id = Some(TENANT.into());
                c.client_id = Some(CLIENT_ID.into());
                c.client_secret_env_var = Some("KEYFOLD_AZURE_TEST_UNSET".into());
            }),
            "`client_secret_env_var`: an operator-only setting",
        ),
        (
            refusal_with(
                AzureKeyWrapper::builder(&base())
                    .environment(no_env)
                    .endpoint_url("http://localhost:8443")
                    .allow_loopback_endpoints_for_tests(true),
            ),
            "endpoint http://localhost:8443 is not https: Key Vault tokens are only sent over TLS",
        ),
        (
            refusal_with(
                AzureKeyWrapper::builder(&AzureConfig {
                    azure_tenant_id: Some(TENANT.into()),
                    ..base()
                })
                .environment(no_env)
                .identity(secret_identity("KEYFOLD_AZURE_TEST_UNSET")),
            ),
            "the client secret variable KEYFOLD_AZURE_TEST_UNSET is unset or empty",
        ),
    ];
    for (text, want) in &cases {
        assert!(text.contains(want), "{text:?} should contain {want:?}");
        assert!(
            text.starts_with("azure configure with key "),
            "{text:?} names the operation and key"
        );
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    // An empty secret variable reads as an unset one, and workload identity
    // without a tenant.
    let mut c = base();
    c.azure_tenant_id = Some(TENANT.into());
    c.client_id = Some(CLIENT_ID.into());
    let text = refusal_with(
        AzureKeyWrapper::builder(&c)
            .identity(secret_identity("KV_SECRET"))
            .environment(|n| (n == "KV_SECRET").then(|| "  ".to_owned())),
    );
    assert!(
        text.contains("the client secret variable KV_SECRET is unset or empty"),
        "{text}"
    );

    let text = refusal_with(AzureKeyWrapper::builder(&base()).environment(|n| {
        (n == "AZURE_FEDERATED_TOKEN_FILE").then(|| "/var/run/secrets/token".to_owned())
    }));
    assert!(
        text.contains("workload identity needs `azure_tenant_id` or AZURE_TENANT_ID"),
        "{text}"
    );

    let text = refusal_with(
        AzureKeyWrapper::builder(&base())
            .environment(no_env)
            .authority_host("http://login.example"),
    );
    assert!(
        text.contains("authority host http://login.example is not https"),
        "{text}"
    );

    // A workload token file that cannot be read.
    let mut c = base();
    c.azure_tenant_id = Some(TENANT.into());
    c.client_id = Some(CLIENT_ID.into());
    let text = refusal_with(AzureKeyWrapper::builder(&c).environment(|n| match n {
        "AZURE_FEDERATED_TOKEN_FILE" => Some("/nonexistent/keyfold/token".to_owned()),
        "AZURE_CLIENT_ID" => Some(CLIENT_ID.to_owned()),
        _ => None,
    }));
    assert!(text.contains("workload identity"), "{text}");
}

#[test]
fn inline_secrets_in_a_provider_config_are_refused() {
    for field in ["client_secret", "secret", "password", "client_certificate"] {
        let err = serde_json::from_value::<ProviderConfig>(json!({
            "provider": "azure",
            "kms_key_ref": "https://acme-keys.vault.azure.net/keys/tenant-a",
            "vault_url": "https://acme-keys.vault.azure.net",
            "azure_tenant_id": TENANT,
            "client_id": CLIENT_ID,
            field: SECRET,
        }))
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("`{field}` holds a static credential")),
            "{text}"
        );
        assert!(text.contains("client_secret_env_var"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }
    // The validated config type refuses it too.
    let err = AzureConfig {
        client_secret_env_var: Some(SECRET.into()),
        azure_tenant_id: Some(TENANT.into()),
        client_id: Some(CLIENT_ID.into()),
        ..base()
    }
    .validate()
    .unwrap_err();
    assert!(
        matches!(err, ConfigError::StaticCredentials { .. }),
        "{err}"
    );
}

#[test]
fn credentials_default_to_managed_then_workload_identity() {
    // Nothing set: system-assigned managed identity.
    let w = AzureKeyWrapper::builder(&base())
        .environment(no_env)
        .build()
        .unwrap();
    assert_eq!(
        *w.credential_source(),
        CredentialSource::ManagedIdentity { client_id: None }
    );
    assert_eq!(w.endpoint(), "https://acme-keys.vault.azure.net");

    // The operator's user-assigned identity; a tenant config may repeat its
    // client id.
    let c = AzureConfig {
        client_id: Some(CLIENT_ID.into()),
        ..base()
    };
    let w = AzureKeyWrapper::builder(&c)
        .identity(AzureIdentity::ManagedIdentity {
            client_id: Some(CLIENT_ID.into()),
        })
        .environment(no_env)
        .build()
        .unwrap();
    assert_eq!(
        *w.credential_source(),
        CredentialSource::ManagedIdentity {
            client_id: Some(CLIENT_ID.into())
        }
    );

    // AKS workload identity advertised: client from the environment (the
    // config may repeat it), tenant from the environment unless the config
    // names it.
    let dir = std::env::temp_dir().join(format!("keyfold-azure-wi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "header.payload.signature").unwrap();
    let file = token_file.display().to_string();
    let env = move |n: &str| match n {
        "AZURE_FEDERATED_TOKEN_FILE" => Some(file.clone()),
        "AZURE_TENANT_ID" => Some("11111111-1111-1111-1111-111111111111".into()),
        "AZURE_CLIENT_ID" => Some(CLIENT_ID.into()),
        _ => None,
    };
    let w = AzureKeyWrapper::builder(&c)
        .environment(env.clone())
        .build()
        .unwrap();
    assert_eq!(
        *w.credential_source(),
        CredentialSource::WorkloadIdentity {
            tenant_id: "11111111-1111-1111-1111-111111111111".into(),
            client_id: CLIENT_ID.into(),
            token_file: token_file.clone(),
        }
    );

    // The operator's client secret wins over both.
    let c = AzureConfig {
        azure_tenant_id: Some(TENANT.into()),
        client_id: Some(CLIENT_ID.into()),
        ..base()
    };
    let w = AzureKeyWrapper::builder(&c)
        .identity(secret_identity("KV_SECRET"))
        .environment(move |n| {
            if n == "KV_SECRET" {
                Some(SECRET.to_owned())
            } else {
                env(n)
            }
        })
        .build()
        .unwrap();
    assert_eq!(
        *w.credential_source(),
        CredentialSource::ClientSecret {
            tenant_id: TENANT.into(),
            client_id: CLIENT_ID.into(),
            env_var: "KV_SECRET".into(),
        }
    );
    let shown = format!("{w:?}");
    assert!(
        shown.contains("KV_SECRET") && shown.contains("******"),
        "{shown}"
    );
    assert!(!shown.contains("s3cr3t"), "{shown}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn ctx() -> WrapContext {
    WrapContext::new("acme", 1)
}

/// A tenant's config naming its Entra tenant and the operator's client id,
/// against `vault`.
fn secret_config(vault: &FakeVault) -> AzureConfig {
    AzureConfig {
        azure_tenant_id: Some(TENANT.into()),
        client_id: Some(CLIENT_ID.into()),
        ..vault.config("k")
    }
}

/// The builder for `config` with Entra ID's token endpoint on the fake and
/// no test credential: the wrapper picks its own.
fn entra_builder(vault: &FakeVault, config: &AzureConfig) -> keyfold_azure::AzureKeyWrapperBuilder {
    AzureKeyWrapper::builder(config)
        .endpoint_url(vault.endpoint())
        .allow_loopback_endpoints_for_tests(true)
        .transport(vault.transport())
        .authority_host(vault.endpoint())
        .verify_challenge_resource(false)
        .retry_policy(keyfold_core::retry::RetryPolicy::none())
}

#[tokio::test]
async fn the_client_secret_from_the_named_variable_reaches_entra_id() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    vault.register_client(CLIENT_ID, SECRET);
    let w = entra_builder(&vault, &secret_config(&vault))
        .identity(secret_identity("KV_SECRET"))
        .environment(|n| (n == "KV_SECRET").then(|| SECRET.to_owned()))
        .build()
        .unwrap();
    let key = SecretKey::generate().unwrap();
    let wrapped = w.wrap(&key, &ctx()).await.unwrap();
    assert_eq!(
        w.unwrap(&wrapped, &ctx()).await.unwrap().expose(),
        key.expose()
    );

    let requests = vault.token_requests();
    assert_eq!(requests.len(), 1, "the token is cached");
    let r = &requests[0];
    assert!(r.granted);
    assert_eq!(r.tenant, TENANT);
    assert_eq!(r.form["client_id"], CLIENT_ID);
    assert_eq!(r.form["client_secret"], SECRET);
    assert_eq!(r.form["scope"], SCOPE);
    let shown = format!("{w:?}");
    assert!(!shown.contains("s3cr3t"), "{shown}");

    // A wrong secret: Entra refuses, the wrap is denied, the secret unshown.
    let wrong = entra_builder(&vault, &secret_config(&vault))
        .identity(secret_identity("KV_SECRET"))
        .environment(|n| (n == "KV_SECRET").then(|| "wrong-s3cr3t".to_owned()))
        .build()
        .unwrap();
    let err = wrong.wrap(&key, &ctx()).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::AccessDenied, "{err}");
    assert!(err.to_string().contains("Entra ID token"), "{err}");
    assert!(!format!("{err} {err:?}").contains("s3cr3t"), "{err:?}");
}

#[tokio::test]
async fn the_process_environment_is_read_by_default() {
    // PATH is a variable name every test process has; its value stands in
    // for a secret the host set.
    let path = std::env::var("PATH").unwrap();
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    vault.register_client(CLIENT_ID, &path);
    let w = entra_builder(&vault, &secret_config(&vault))
        .identity(secret_identity("PATH"))
        .build()
        .unwrap();
    w.wrap(&SecretKey::generate().unwrap(), &ctx())
        .await
        .unwrap();
    assert_eq!(vault.token_requests()[0].form["client_secret"], path.trim());
}

#[tokio::test]
async fn workload_identity_sends_the_projected_token_as_client_assertion() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("k");
    let assertion = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2ln";
    vault.register_client(CLIENT_ID, assertion);
    let dir = std::env::temp_dir().join(format!("keyfold-azure-wi2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("azure-identity-token");
    std::fs::write(&token_file, assertion).unwrap();
    let file = token_file.display().to_string();
    let config = AzureConfig {
        azure_tenant_id: Some(TENANT.into()),
        client_id: Some(CLIENT_ID.into()),
        ..vault.config("k")
    };
    let w = entra_builder(&vault, &config)
        .environment(move |n| match n {
            "AZURE_FEDERATED_TOKEN_FILE" => Some(file.clone()),
            "AZURE_CLIENT_ID" => Some(CLIENT_ID.to_owned()),
            _ => None,
        })
        .build()
        .unwrap();
    assert!(matches!(
        w.credential_source(),
        CredentialSource::WorkloadIdentity { .. }
    ));
    let key = SecretKey::generate().unwrap();
    let wrapped = w.wrap(&key, &ctx()).await.unwrap();
    assert_eq!(
        w.unwrap(&wrapped, &ctx()).await.unwrap().expose(),
        key.expose()
    );
    let r = &vault.token_requests()[0];
    assert!(r.granted);
    assert_eq!(r.form["client_assertion"], assertion);
    assert_eq!(
        r.form["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn debug_shows_no_secret_or_token() {
    let c = AzureConfig {
        azure_tenant_id: Some(TENANT.into()),
        client_id: Some(CLIENT_ID.into()),
        ..base()
    };
    let builder = AzureKeyWrapper::builder(&c)
        .identity(secret_identity("KV_SECRET"))
        .environment(|n| (n == "KV_SECRET").then(|| SECRET.to_owned()))
        .credential(Arc::new(support::TestCredential::default()));
    let shown_builder = format!("{builder:?}");
    let w = builder.build().unwrap();
    let shown = format!("{w:?} {shown_builder} {:?}", w.credential_source());
    for secret in ["s3cr3t", support::TOKEN] {
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(shown.contains("tenant-a"), "{shown}");
    let source = CredentialSource::ClientSecret {
        tenant_id: TENANT.into(),
        client_id: CLIENT_ID.into(),
        env_var: "KV_SECRET".into(),
    };
    assert!(format!("{source:?}").contains("secret: \"******\""));
}
