//! `tenant-kms-service [--config FILE]`: see the README, "Run the example service".
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use tenant_kms_service::config::{Database, ServiceConfig};
use tenant_kms_service::tenants::Providers;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The config, and in the development setup the file of its demo tokens.
fn config() -> Result<(ServiceConfig, Option<PathBuf>), BoxError> {
    let mut args = std::env::args().skip(1);
    let mut file = std::env::var_os("TENANT_KMS_CONFIG").map(PathBuf::from);
    let mut database = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => file = Some(args.next().ok_or("--config needs a file")?.into()),
            "--database" => {
                let db = args
                    .next()
                    .ok_or("--database needs a SQLite path or a postgres:// URL")?;
                database = Some(Database::parse(&db)?);
            }
            "-h" | "--help" => {
                println!(
                    "usage: tenant-kms-service [--config FILE] [--database PATH|postgres://…]\n\
                     Without a config file: a development setup in $TENANT_KMS_DATA \
                     (default ./tenant-kms-data) on the local KEK, listening on \
                     $TENANT_KMS_LISTEN (default 127.0.0.1:8080), /metrics on \
                     $TENANT_KMS_METRICS_LISTEN (default: none).\n\
                     --database overrides the config's: a SQLite file, or a PostgreSQL \
                     URL shared by every instance of a fleet."
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    let (mut config, tokens) = match file {
        Some(f) => (ServiceConfig::from_file(&f)?, None),
        None => {
            let dir = std::env::var_os("TENANT_KMS_DATA")
                .map_or_else(|| PathBuf::from("tenant-kms-data"), PathBuf::from);
            let listen: SocketAddr = std::env::var("TENANT_KMS_LISTEN")
                .unwrap_or_else(|_| "127.0.0.1:8080".into())
                .parse()?;
            let mut config = ServiceConfig::dev(&dir, listen)?;
            if let Ok(at) = std::env::var("TENANT_KMS_METRICS_LISTEN") {
                config.metrics_listen = Some(at.parse()?);
            }
            eprintln!(
                "development setup in {}: local KEK `dev-kek`, tenants acme and globex; \
                 their admin tokens: `source {}`",
                dir.display(),
                dir.join("dev-tokens.env").display()
            );
            (config, Some(dir.join("dev-tokens.env")))
        }
    };
    if let Some(db) = database {
        config.database = db;
    }
    Ok((config, tokens))
}

/// Development setup only: keeps the demo tenants' TOTP secrets next to
/// their bearer tokens (an owner-only file), so the README's session works.
fn remember_dev_secrets(
    file: &std::path::Path,
    enrolments: &[tenant_kms_service::stepup::Enrolment],
) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(file)?;
    for e in enrolments {
        let name: String = e
            .tenant
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        writeln!(f, "export {name}_TOTP_SECRET={}", e.secret_base32)?;
    }
    f.sync_all()
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (config, dev_tokens) = config()?;
    let providers = Providers::local(config.local_keks.clone());
    #[cfg(feature = "aws")]
    let providers = {
        // Role-based only: the base credentials come from the default chain
        // (environment, instance or pod role); every tenant's role is assumed
        // on top of them. AWS_ENDPOINT_URL_STS points STS at an emulator.
        let mut aws = keyfold::aws::AwsWrapperFactory::new();
        if let Ok(url) = std::env::var("AWS_ENDPOINT_URL_STS") {
            aws = aws.sts_endpoint_url(url);
        }
        if let Some(url) = config.provider_endpoints.get("aws") {
            aws = aws.kms_endpoint_url(url);
        }
        providers.with("aws", std::sync::Arc::new(aws))
    };
    // GCP: the ambient identity (workload identity, metadata server, ADC)
    // impersonates each tenant's service account.
    #[cfg(feature = "gcp")]
    let providers = {
        let mut gcp = keyfold::gcp::GcpWrapperFactory::new();
        if let Some(url) = config.provider_endpoints.get("gcp") {
            gcp = gcp.endpoint_url(url);
        }
        providers.with("gcp", std::sync::Arc::new(gcp))
    };
    // Azure: managed or workload identity.
    #[cfg(feature = "azure")]
    let providers = {
        let mut azure = keyfold::azure::AzureFactory::new();
        if let Some(url) = config.provider_endpoints.get("azure") {
            azure = azure.endpoint_url(url);
        }
        providers.with("azure", std::sync::Arc::new(azure))
    };
    let service = tenant_kms_service::start(config, providers).await?;
    for e in &service.enrolments {
        // Shown once: the secret is never printed again. Hand it to the
        // tenant admin over a trusted channel.
        println!(
            "tenant {}: step-up second factor enrolled for {}; add it to their authenticator app now, it will not be shown again:\n  {}\n  (secret {})",
            e.tenant, e.admin, e.otpauth_uri, e.secret_base32
        );
    }
    if let Some(file) = dev_tokens {
        remember_dev_secrets(&file, &service.enrolments)?;
    }
    eprintln!("tenant-kms-service listening on http://{}", service.addr);
    if let Some(at) = service.metrics_addr {
        eprintln!("metrics on http://{at}/metrics");
    }
    let stopper = service.stopper();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("shutting down");
            let _ = stopper.send(true);
        }
    });
    service.wait().await?;
    Ok(())
}
