//! Onboarding probe and a KMS rotation against an AWS KMS endpoint.
//!
//! ```sh
//! "$KEYFOLD_MOTO_SERVER" -H 127.0.0.1 -p 5123 &
//! AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
//!   cargo run -p keyfold-aws --example aws_onboard -- http://127.0.0.1:5123
//! ```
//!
//! Arguments: `ENDPOINT [KEY_REF [ROLE_ARN [EXTERNAL_ID]]]`. Without a key
//! reference a key is created at the endpoint (an emulator). STS is reached
//! at the same endpoint (moto serves both); the base credentials come from the
//! default chain (here the environment) and only ever call `AssumeRole`.
//! The region is `AWS_REGION`, default `eu-west-1`.

use std::error::Error;

use aws_config::BehaviorVersion;
use keyfold_aws::AwsKmsWrapper;
use keyfold_core::config::AwsConfig;
use keyfold_core::{KeyWrapper, SecretKey, WrapContext};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let endpoint = args
        .next()
        .ok_or("usage: aws_onboard ENDPOINT [KEY_REF [ROLE_ARN [EXTERNAL_ID]]]")?;
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "eu-west-1".into());
    let admin = {
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_sdk_kms::config::Region::new(region.clone()))
            .endpoint_url(&endpoint)
            .load()
            .await;
        aws_sdk_kms::Client::new(&conf)
    };
    let key_ref = match args.next() {
        Some(k) => k,
        None => {
            let created = admin
                .create_key()
                .description("keyfold onboarding example")
                .send()
                .await?;
            let arn = created
                .key_metadata()
                .and_then(|m| m.arn())
                .ok_or("CreateKey returned no ARN")?
                .to_owned();
            println!("created key {arn}");
            arn
        }
    };
    let role_arn = args
        .next()
        .unwrap_or_else(|| "arn:aws:iam::123456789012:role/keyfold-onboard".into());
    let external_id = args.next().or_else(|| Some("keyfold-example".into()));
    let config = AwsConfig {
        kms_key_ref: key_ref.clone(),
        region,
        role_arn,
        external_id,
        endpoint_url: None,
    };
    // The config above is what a tenant may say; the endpoint is the
    // operator's setting. The loopback switch lets it reach an emulator on
    // this machine: never turn it on in production.
    let kms = AwsKmsWrapper::builder(config)
        .kms_endpoint_url(&endpoint)
        .allow_loopback_endpoints_for_tests(true)
        .sts_endpoint_url(&endpoint)
        .build()
        .await?;

    let ok = keyfold_core::probe::probe(&kms).await?;
    println!(
        "probe ok: live 32-byte round trip under {key_ref} in {:?}",
        ok.elapsed
    );

    let v1 = WrapContext::new("example-tenant", 1);
    let master = SecretKey::generate()?;
    let wrapped = kms.wrap(&master, &v1).await?;
    println!("wrapped master key v1 under {}", wrapped.key_ref);

    admin
        .rotate_key_on_demand()
        .key_id(&wrapped.key_ref)
        .send()
        .await?;
    println!("rotated the KMS key on demand");

    let back = kms.unwrap(&wrapped, &v1).await?;
    assert_eq!(back.expose(), master.expose());
    keyfold_core::probe::probe(&kms).await?;
    println!("after rotation: v1 still unwraps and the probe passes");
    Ok(())
}
