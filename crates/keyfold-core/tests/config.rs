//! Provider configs: key reference formats, refusal of static credentials.

use keyfold_core::config::{AwsKeyRef, AzureKeyRef, ConfigError, GcpKeyRef, ProviderConfig};
use serde_json::json;

fn parse(v: serde_json::Value) -> Result<ProviderConfig, String> {
    serde_json::from_value::<ProviderConfig>(v).map_err(|e| e.to_string())
}

#[test]
fn aws_key_refs() {
    assert!(matches!(
        AwsKeyRef::parse(
            "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        ),
        Ok(AwsKeyRef::KeyArn { .. })
    ));
    assert!(matches!(
        AwsKeyRef::parse("arn:aws:kms:us-east-1:111122223333:alias/tenant-a"),
        Ok(AwsKeyRef::AliasArn { .. })
    ));
    assert_eq!(
        AwsKeyRef::parse("alias/tenant-a"),
        Ok(AwsKeyRef::Alias("tenant-a".into()))
    );
    for bad in [
        "",
        "tenant-a",
        "alias/",
        "alias/aws/ebs",
        "arn:aws:kms:eu-west-1:1111:key/x",
        "arn:aws:s3:eu-west-1:111122223333:key/abc",
        "arn:aws:kms:eu-west-1:111122223333:secret/abc",
    ] {
        assert!(
            matches!(
                AwsKeyRef::parse(bad),
                Err(ConfigError::InvalidKeyRef { .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn gcp_key_refs() {
    let k = GcpKeyRef::parse("projects/p1/locations/europe-west1/keyRings/r/cryptoKeys/k").unwrap();
    assert_eq!(k.crypto_key, "k");
    let err = GcpKeyRef::parse(
        "projects/p1/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/3",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("CryptoKeyVersion"), "{err}");
    assert!(GcpKeyRef::parse("projects/p1/keyRings/r/cryptoKeys/k").is_err());
}

#[test]
fn azure_key_refs() {
    let k = AzureKeyRef::parse("https://tenant-a-vault.vault.azure.net/keys/master").unwrap();
    assert_eq!(k.vault_url, "https://tenant-a-vault.vault.azure.net");
    assert_eq!(k.version, None);
    let k = AzureKeyRef::parse(
        "https://hsm1.managedhsm.azure.net/keys/master/0123456789abcdef0123456789abcdef",
    )
    .unwrap();
    assert_eq!(
        k.version.as_deref(),
        Some("0123456789abcdef0123456789abcdef")
    );
    for bad in [
        "http://v1.vault.azure.net/keys/k",
        "https://vault1.example.com/keys/k",
        "https://vault1.vault.azure.net/secrets/k",
        "https://vault1.vault.azure.net/keys/k/notaversion",
    ] {
        assert!(AzureKeyRef::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn static_credentials_are_refused_with_advice() {
    let err = parse(json!({
        "provider": "aws", "kms_key_ref": "alias/k", "region": "eu-west-1",
        "role_arn": "arn:aws:iam::111122223333:role/r", "access_key_id": "AKIA..."
    }))
    .unwrap_err();
    assert!(
        err.contains("access_key_id") && err.contains("role_arn"),
        "{err}"
    );

    let err = parse(json!({
        "provider": "gcp", "kms_key_ref": "projects/p/locations/l/keyRings/r/cryptoKeys/k",
        "impersonate_service_account": "sa@p.iam.gserviceaccount.com",
        "credentials_json": "{\"type\":\"service_account\"}"
    }))
    .unwrap_err();
    assert!(err.contains("impersonate_service_account"), "{err}");

    let err = parse(json!({
        "provider": "azure", "kms_key_ref": "https://vault1.vault.azure.net/keys/k",
        "vault_url": "https://vault1.vault.azure.net", "client_secret": "s3cr3t"
    }))
    .unwrap_err();
    assert!(
        err.contains("client_secret_env_var") && !err.contains("s3cr3t"),
        "{err}"
    );

    // An inline secret given where the variable's name belongs.
    let err = parse(json!({
        "provider": "azure", "kms_key_ref": "https://vault1.vault.azure.net/keys/k",
        "vault_url": "https://vault1.vault.azure.net", "azure_tenant_id": "t", "client_id": "c",
        "client_secret_env_var": "Xy7~abc.secret-value"
    }))
    .unwrap_err();
    assert!(err.contains("NAME"), "{err}");
}

#[test]
fn valid_configs_round_trip_through_serde() {
    for v in [
        json!({"provider": "local", "kms_key_ref": "dev", "kek_env_var": "KEYFOLD_KEK"}),
        json!({"provider": "aws", "kms_key_ref": "arn:aws:kms:eu-west-1:111122223333:alias/a",
               "region": "eu-west-1", "role_arn": "arn:aws:iam::111122223333:role/r", "external_id": "xid"}),
        json!({"provider": "gcp", "kms_key_ref": "projects/p/locations/l/keyRings/r/cryptoKeys/k",
               "impersonate_service_account": "sa@p.iam.gserviceaccount.com"}),
        json!({"provider": "azure", "kms_key_ref": "https://vault1.vault.azure.net/keys/k",
               "vault_url": "https://vault1.vault.azure.net", "azure_tenant_id": "t", "client_id": "c",
               "client_secret_env_var": "AZURE_CLIENT_SECRET"}),
    ] {
        let cfg = parse(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&cfg).unwrap(), v);
    }
}

#[test]
fn mismatched_fields_are_refused() {
    // Region differs from the key ARN's.
    assert!(
        parse(
            json!({"provider": "aws", "kms_key_ref": "arn:aws:kms:eu-west-1:111122223333:alias/a",
        "region": "us-east-1", "role_arn": "arn:aws:iam::111122223333:role/r"})
        )
        .is_err()
    );
    // Unknown field.
    assert!(
        parse(json!({"provider": "local", "kms_key_ref": "dev", "kek_env_var": "K", "extra": 1}))
            .is_err()
    );
    // Unknown provider.
    assert!(parse(json!({"provider": "vault", "kms_key_ref": "x"})).is_err());
    // Vault URL not the key's.
    assert!(
        parse(
            json!({"provider": "azure", "kms_key_ref": "https://vault1.vault.azure.net/keys/k",
        "vault_url": "https://vault2.vault.azure.net"})
        )
        .is_err()
    );
}

#[test]
fn plain_http_endpoints_only_to_loopback() {
    use keyfold_core::config::check_endpoint_url;
    for ok in [
        "https://kms.eu-west-1.amazonaws.com",
        "http://127.0.0.1:5000",
        "http://localhost:4566/",
        "http://[::1]:8443",
        "http://127.0.0.2",
    ] {
        assert!(check_endpoint_url("aws", ok).is_ok(), "{ok}");
    }
    for bad in [
        "http://10.0.0.1:5000",
        "http://kms.internal",
        "http://localhost.evil.com",
        "http://[2001:db8::1]:80",
        "ftp://127.0.0.1",
        "127.0.0.1:5000",
        // User info: the connection goes to the host after the `@`.
        "http://127.0.0.1:80@kms.evil.example",
        "http://localhost@kms.evil.example/",
        "https://user:pw@kms.example.com",
        "http://127.0.0.1:80%40kms.evil.example",
        "http://127.0.0.1\\@kms.evil.example",
        "http://127.0.0.1:",
        "http://127.0.0.1:99999",
        "http://[::1:80",
        "http://",
    ] {
        let err = check_endpoint_url("aws", bad).unwrap_err().to_string();
        assert!(err.contains("endpoint_url"), "{bad}: {err}");
    }
    let err = parse(
        json!({"provider": "aws", "kms_key_ref": "alias/k", "region": "eu-west-1",
        "role_arn": "arn:aws:iam::111122223333:role/r", "external_id": "xid",
        "endpoint_url": "http://kms.example.com"}),
    )
    .unwrap_err();
    assert!(err.contains("loopback"), "{err}");
}

#[test]
fn aws_config_debug_hides_the_external_id() {
    let cfg = parse(
        json!({"provider": "aws", "kms_key_ref": "alias/k", "region": "eu-west-1",
        "role_arn": "arn:aws:iam::111122223333:role/r", "external_id": "tenant-secret-xid"}),
    )
    .unwrap();
    let shown = format!("{cfg:?}");
    assert!(
        shown.contains("******") && !shown.contains("tenant-secret-xid"),
        "{shown}"
    );
}
