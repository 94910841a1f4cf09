//! keyfold quickstart: one tenant's keyring on a local KEK, from the first
//! key to destroying a version, with every step printed.
//!
//! ```text
//! cargo run --example quickstart
//! KEYFOLD_KEK=$(openssl rand -hex 32) cargo run --example quickstart
//! ```

use std::error::Error;
use std::sync::Arc;

use keyfold_core::audit::{Actor, AuditEvent, AuditKind, AuditSink};
use keyfold_core::keyring::{DestroyAuthorization, Keyring, KeyringMetadata, NoRecordsLeft};
use keyfold_core::local::LocalKekError;
use keyfold_core::store::FileStore;
use keyfold_core::time::Timestamp;
use keyfold_core::{EncryptionContext, LocalKek, SecretKey, format, record};

/// Prints each audit event as it happens (a real host would store them).
#[derive(Debug)]
struct PrintSink;

impl AuditSink for PrintSink {
    fn record(&self, event: AuditEvent) {
        let what = match &event.kind {
            AuditKind::Rotate {
                new_version,
                previous_version,
                ..
            } => match previous_version {
                Some(p) => format!("new active version v{new_version}, replacing v{p}"),
                None => format!("first active version v{new_version}"),
            },
            AuditKind::StateChanged {
                version,
                from,
                to,
                forced,
                detail,
                ..
            } => format!(
                "v{version}: {from} -> {to}{}{}",
                if *forced { " (FORCED)" } else { "" },
                detail
                    .as_deref()
                    .map(|d| format!(", evidence: {d}"))
                    .unwrap_or_default()
            ),
            other => format!("{other:?}"),
        };
        println!("      [audit] {} by {}: {what}", event.name(), event.actor);
    }
}

fn show(meta: &KeyringMetadata) {
    println!(
        "    keyring {}  (store revision {}, wrapped by {} key {:?})",
        meta.keyring_id, meta.revision, meta.wrap_provider, meta.wrap_key_ref
    );
    println!(
        "    latest v{}  active v{}  min decryption v{}  versions: {}",
        meta.latest_version.unwrap_or(0),
        meta.active_version.unwrap_or(0),
        meta.min_decryption_version.unwrap_or(0),
        meta.version_count
    );
    for v in &meta.versions {
        let t = |t: Option<Timestamp>| t.map_or("-".to_owned(), |t| t.as_secs().to_string());
        println!(
            "      v{:<3} {:<10} created {}  activated {}  retired {}  disabled {}  destroyed {}",
            v.version,
            v.state.to_string(),
            v.created_at.as_secs(),
            t(v.activated_at),
            t(v.retired_at),
            t(v.disabled_at),
            t(v.destroyed_at),
        );
    }
}

fn step(n: u32, title: &str) {
    println!("\n{n}. {title}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    println!("keyfold quickstart: envelope encryption with a key-version lifecycle");

    step(1, "Key-encryption key (KEK)");
    let kek = match LocalKek::from_env("quickstart-kek", "KEYFOLD_KEK") {
        Ok(kek) => {
            println!("    using the KEK from KEYFOLD_KEK");
            kek
        }
        Err(LocalKekError::MissingEnv(_)) => {
            println!("    KEYFOLD_KEK is not set: generating an EPHEMERAL KEK for this run.");
            println!(
                "    (Set KEYFOLD_KEK to 32 bytes of hex or base64 to keep keys across runs.)"
            );
            LocalKek::from_bytes("quickstart-kek", SecretKey::generate()?)
        }
        // Set but unusable: say so rather than silently using another key.
        Err(e) => return Err(format!("KEYFOLD_KEK: {e}").into()),
    };
    println!("    the onboarding probe (wrap + unwrap of a random key) passes:");
    let ok = keyfold_core::probe::probe(&kek).await?;
    println!("      {} key {:?} answered", ok.provider, ok.key_ref);

    let mut rnd = [0u8; 6];
    keyfold_core::rng::fill(&mut rnd)?;
    let suffix: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    let dir = std::env::temp_dir().join(format!("keyfold-quickstart-{suffix}"));
    let store = Arc::new(FileStore::new(&dir)?);

    step(
        2,
        "Create the tenant's keyring and its first master key version",
    );
    let ring = Keyring::builder("tenant-acme", Arc::new(kek), store.clone())
        .audit(Arc::new(PrintSink))
        // This demo is the only instance: no other instance's stale view to
        // wait out before destroying (production keeps the 30 s default).
        .max_staleness(std::time::Duration::ZERO)
        // Nor does it wait out the 24 h grace period in `Disabled` or a
        // write window (production keeps both; see docs/LIFECYCLE.md).
        .destroy_grace(std::time::Duration::ZERO)
        .write_window(std::time::Duration::ZERO)
        .create()
        .await?;
    let alice = Actor::new("alice@acme.example");
    let v1 = ring.rotate(&alice).await?;
    println!(
        "    v{} is active; it is stored only wrapped under the KEK",
        v1.version
    );

    step(3, "Encrypt a record (the context binds it to its row)");
    let ctx = EncryptionContext::new()
        .with("tenant", "acme")
        .with("table", "cards")
        .with("row", "42");
    let old_record = ring.encrypt(&ctx, b"4111 1111 1111 1111").await?;
    println!(
        "    {} bytes of ciphertext for 19 bytes of plaintext; header says version v{}",
        old_record.len(),
        format::inspect(&old_record)?.key_version
    );
    let moved = EncryptionContext::new()
        .with("tenant", "acme")
        .with("table", "cards")
        .with("row", "43");
    match ring.decrypt(&moved, &old_record).await {
        Err(e) => println!("    copied to row 43 it fails: {e}"),
        Ok(_) => return Err("a record moved to another row decrypted".into()),
    }

    step(
        4,
        "Rotate: a new version becomes active, the old one is retired",
    );
    let v2 = ring.rotate(&alice).await?;
    let fresh = ring.encrypt(&ctx, b"5500 0000 0000 0004").await?;
    println!(
        "    v{} is active; a new record's header says v{}",
        v2.version,
        format::inspect(&fresh)?.key_version
    );

    step(5, "Decrypt the old record: its header picks v1 by itself");
    let plain = ring.decrypt(&ctx, &old_record).await?;
    println!("    -> {:?}", String::from_utf8_lossy(&plain));

    step(
        6,
        "Rewrap the old record to v2 (header only; the payload is untouched)",
    );
    let from = ring.master_key(1).await?;
    let to = ring.master_key(v2.version).await?;
    let rewrapped = record::rewrap(&old_record, &from, &to, &ctx)?;
    let payload_at = format::HEADER_LEN;
    println!(
        "    now on v{}; payload bytes identical: {}",
        format::inspect(&rewrapped)?.key_version,
        old_record.get(payload_at..) == rewrapped.get(payload_at..)
    );
    println!(
        "    decrypts to {:?}",
        String::from_utf8_lossy(&ring.decrypt(&ctx, &rewrapped).await?)
    );

    step(7, "Metadata, as a KMS shows it");
    show(&ring.metadata());

    step(
        8,
        "Disable v1 (reversible grace period): its records stop decrypting",
    );
    ring.disable(1, &alice).await?;
    match ring.decrypt(&ctx, &old_record).await {
        Err(e) => println!("    the un-rewrapped copy: {e}"),
        Ok(_) => return Err("a disabled version decrypted".into()),
    }

    step(9, "Destroy v1, with evidence that no record is left on it");
    // Evidence counts only if gathered once v1's retirement has settled:
    // max staleness (zero here) plus one second, because timestamps are
    // whole seconds. In production it comes from the rewrap job's report.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let evidence = NoRecordsLeft {
        keyring_id: ring.id().to_owned(),
        version: 1,
        source: "quickstart: the only v1 record was rewrapped in step 6".into(),
        checked_at: Timestamp::now(),
    };
    ring.destroy(1, DestroyAuthorization::Evidence(evidence), &alice)
        .await?;
    match ring.decrypt(&ctx, &old_record).await {
        Err(e) => println!("    the old copy is gone for good: {e}"),
        Ok(_) => return Err("a destroyed version decrypted".into()),
    }
    println!(
        "    the rewrapped record still decrypts: {:?}",
        String::from_utf8_lossy(&ring.decrypt(&ctx, &rewrapped).await?)
    );
    show(&ring.metadata());

    step(10, "What the store holds (wrapped keys and states only)");
    let path = store.path_of("tenant-acme");
    let stored = std::fs::read_to_string(&path)?;
    println!("    {} ({} bytes):", path.display(), stored.len());
    for line in stored.lines() {
        println!("      {line}");
    }
    std::fs::remove_dir_all(&dir)?;
    println!("\nDone: removed {}", dir.display());
    Ok(())
}
