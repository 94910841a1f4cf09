//! Config validation: every refused form is refused with a message that says
//! what to do, and a valid config builds a wrapper without any network call.
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use keyfold_aws::AwsKmsWrapper;
use keyfold_core::config::{AwsConfig, ConfigError, ProviderConfig};
use keyfold_core::{KeyWrapper, WrapErrorKind, WrapOperation};
use serde_json::{Value, json};

const KEY_ARN: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
const ROLE: &str = "arn:aws:iam::111122223333:role/keyfold";

fn valid() -> Value {
    json!({
        "provider": "aws",
        "kms_key_ref": KEY_ARN,
        "region": "eu-west-1",
        "role_arn": ROLE,
        "external_id": "tenant-a"
    })
}

fn with(field: &str, value: Value) -> Value {
    let mut v = valid();
    v[field] = value;
    v
}

fn refused(v: Value) -> String {
    match serde_json::from_value::<ProviderConfig>(v.clone()) {
        Ok(c) => panic!("accepted {v}: {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn valid_forms_are_accepted() {
    for key_ref in [
        KEY_ARN,
        "arn:aws:kms:eu-west-1:111122223333:alias/tenant-a",
        "alias/tenant-a",
    ] {
        let c: ProviderConfig =
            serde_json::from_value(with("kms_key_ref", json!(key_ref))).unwrap();
        c.validate().unwrap();
    }
    let mut v = valid();
    v["endpoint_url"] = json!("https://vpce-0abc.kms.eu-west-1.vpce.amazonaws.com");
    serde_json::from_value::<ProviderConfig>(v).unwrap();
}

#[test]
fn the_external_id_is_required() {
    let mut v = valid();
    v.as_object_mut().unwrap().remove("external_id");
    let err = serde_json::from_value::<ProviderConfig>(v)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("external_id") && err.contains("confused-deputy"),
        "{err}"
    );
}

#[test]
fn static_credentials_are_refused_with_a_pointer_to_roles() {
    for field in [
        "access_key_id",
        "secret_access_key",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    ] {
        let msg = refused(with(field, json!("AKIAIOSFODNN7EXAMPLE")));
        assert!(msg.contains(field), "{field}: {msg}");
        assert!(msg.contains("static credential"), "{field}: {msg}");
        assert!(msg.contains("role_arn"), "{field}: {msg}");
        assert!(!msg.contains("AKIAIOSFODNN7EXAMPLE"), "{field}: {msg}");
    }
}

#[test]
fn unknown_fields_are_refused() {
    // Note: keyfold-core's message names the field but does not (yet) say
    // to use a role; the static-credential names above do.
    for field in ["credentials", "profile", "aws_secret"] {
        let msg = refused(with(field, json!("x")));
        assert!(msg.contains(&format!("unknown field `{field}`")), "{msg}");
    }
}

#[test]
fn bad_values_are_refused_with_the_reason() {
    for (field, value, expect) in [
        (
            "kms_key_ref",
            json!("tenant-a"),
            "expected arn:aws:kms:REGION:ACCOUNT:key/ID",
        ),
        ("kms_key_ref", json!("alias/aws/ebs"), "not aws/"),
        (
            "kms_key_ref",
            json!("arn:aws:kms:eu-west-1:1111:key/abc"),
            "12-digit account",
        ),
        (
            "kms_key_ref",
            json!("arn:aws:kms:eu-west-1:111122223333:secret/abc"),
            "key/ID or alias/NAME",
        ),
        ("region", json!("us-east-1"), "the key is in eu-west-1"),
        ("region", json!("Europe"), "not an AWS region"),
        (
            "role_arn",
            json!("arn:aws:iam::111122223333:user/bob"),
            "arn:aws:iam::ACCOUNT:role/NAME",
        ),
        (
            "role_arn",
            json!("keyfold"),
            "arn:aws:iam::ACCOUNT:role/NAME",
        ),
        ("external_id", json!("x"), "2..=1224"),
        ("endpoint_url", json!("kms.internal:443"), "https:// URL"),
        ("endpoint_url", json!("http://kms.internal"), "loopback"),
    ] {
        let msg = refused(with(field, value.clone()));
        assert!(msg.contains(expect), "{field}={value}: {msg}");
    }
    let mut v = valid();
    v.as_object_mut().unwrap().remove("role_arn");
    assert!(refused(v).contains("role_arn"));
}

fn config(key_ref: &str, role_arn: &str) -> AwsConfig {
    AwsConfig {
        kms_key_ref: key_ref.into(),
        region: "eu-west-1".into(),
        role_arn: role_arn.into(),
        external_id: Some("tenant-a-secret-ish".into()),
        endpoint_url: None,
    }
}

#[tokio::test]
async fn the_wrapper_refuses_an_invalid_config() {
    let err = AwsKmsWrapper::new(config(KEY_ARN, "arn:aws:iam::111122223333:user/bob"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Misconfigured);
    assert_eq!(err.operation, WrapOperation::Configure);
    let text = err.to_string();
    assert!(
        text.contains(KEY_ARN) && text.contains("role_arn"),
        "{text}"
    );
    assert!(matches!(
        err.source
            .as_deref()
            .and_then(|s| s.downcast_ref::<ConfigError>()),
        Some(ConfigError::InvalidField {
            field: "role_arn",
            ..
        })
    ));

    let local: ProviderConfig = serde_json::from_value(json!({
        "provider": "local", "kms_key_ref": "dev", "kek_env_var": "KEK"
    }))
    .unwrap();
    let err = AwsKmsWrapper::from_provider_config(local)
        .await
        .unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::Misconfigured);
    assert!(err.to_string().contains("local config"), "{err}");
}

#[tokio::test]
async fn a_valid_config_builds_offline_and_debug_hides_the_external_id() {
    let c: ProviderConfig = serde_json::from_value(valid()).unwrap();
    let w = AwsKmsWrapper::from_provider_config(c).await.unwrap();
    assert_eq!(w.key_ref(), KEY_ARN);
    assert_eq!(w.provider(), "aws");
    let shown = format!("{w:?}");
    assert!(shown.contains(KEY_ARN) && shown.contains(ROLE), "{shown}");
    assert!(!shown.contains("tenant-a\""), "{shown}");
    assert!(shown.contains("******"), "{shown}");
}

#[tokio::test]
async fn wrapped_keys_naming_another_key_are_refused_before_any_kms_call() {
    use keyfold_core::{WrapContext, WrappedKey};
    // No endpoint is reachable here: every case must be refused locally.
    let mut cfg = config("arn:aws:kms:eu-west-1:111122223333:alias/tenant-a", ROLE);
    let builder = |cfg: &AwsConfig| {
        AwsKmsWrapper::builder(cfg.clone())
            .kms_endpoint_url("http://127.0.0.1:9")
            .allow_loopback_endpoints_for_tests(true)
            .retry_policy(keyfold_core::retry::RetryPolicy::none())
    };
    let alias_arn = builder(&cfg).build().await.unwrap();
    cfg.kms_key_ref = "alias/tenant-a".into();
    let alias = builder(&cfg).build().await.unwrap();
    cfg.kms_key_ref = KEY_ARN.into();
    let key_arn = builder(&cfg).build().await.unwrap();
    let blob = |key_ref: &str| WrappedKey {
        provider: "aws".into(),
        key_ref: key_ref.into(),
        kms_key_version: None,
        bytes: vec![1; 64],
    };
    let ctx = WrapContext::new("tenant-a", 1);
    let other_account =
        "arn:aws:kms:eu-west-1:999999999999:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let other_region =
        "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let other_key = "arn:aws:kms:eu-west-1:111122223333:key/ffffffff-12ab-34cd-56ef-1234567890ab";
    for (wrapper, key_ref) in [
        (&alias_arn, other_account),
        (&alias_arn, other_region),
        (&alias, other_region),
        // `alias/NAME` resolves in the role's account, never another one.
        (&alias, other_account),
        (&key_arn, other_key),
        (&key_arn, other_account),
        (&key_arn, "alias/tenant-a"),
        (&alias, "not-an-arn"),
    ] {
        let err = wrapper.unwrap(&blob(key_ref), &ctx).await.unwrap_err();
        assert_eq!(err.kind, WrapErrorKind::KeyMismatch, "{key_ref}: {err}");
        assert_eq!(err.operation, WrapOperation::Unwrap);
        assert!(err.to_string().contains(key_ref), "{err}");
    }
}
