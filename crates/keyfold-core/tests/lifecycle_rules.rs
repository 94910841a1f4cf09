//! Issue #16's lifecycle rules on a manual clock: transient seals heal by
//! themselves while an operator's seal holds; destroy's grace period,
//! schedule and typed refusals; the minimum decryption version; the write
//! window. tests/fleet.rs checks the same bounds with several instances on
//! the real clock.

use std::sync::Arc;
use std::time::Duration;

use keyfold_core::audit::RecordingSink;
use keyfold_core::keyring::{
    DestroyAuthorization, DestroyRefusal, KeyState, Keyring, NoRecordsLeft,
};
use keyfold_core::retry::RetryPolicy;
use keyfold_core::store::MemoryStore;
use keyfold_core::testkit::CountingWrapper;
use keyfold_core::time::{Clock, ManualClock, Timestamp};
use keyfold_core::{
    Actor, EncryptionContext, Error, LocalKek, RotationPolicy, SecretKey, WrapErrorKind,
};

const GRACE: Duration = Duration::from_secs(3600);
const WINDOW: Duration = Duration::from_secs(10);

struct Ring {
    ring: Keyring,
    kms: Arc<CountingWrapper<LocalKek>>,
    clock: ManualClock,
    sink: Arc<RecordingSink>,
}

async fn ring() -> Ring {
    let kms = CountingWrapper::shared(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let clock = ManualClock::new(Timestamp(1_800_000_000));
    let sink = Arc::new(RecordingSink::default());
    let ring = Keyring::builder("acme", kms.clone(), Arc::new(MemoryStore::new()))
        .clock(Arc::new(clock.clone()))
        .audit(sink.clone())
        .retry_policy(RetryPolicy::none())
        .destroy_grace(GRACE)
        .write_window(WINDOW)
        .create()
        .await
        .unwrap();
    ring.rotate(&admin()).await.unwrap();
    Ring {
        ring,
        kms,
        clock,
        sink,
    }
}

fn admin() -> Actor {
    Actor::new("admin@example.com")
}

fn ctx() -> EncryptionContext {
    EncryptionContext::new().with("row", "7")
}

fn evidence(version: u32, at: Timestamp) -> DestroyAuthorization {
    DestroyAuthorization::Evidence(NoRecordsLeft {
        keyring_id: "acme".into(),
        version,
        source: "scan".into(),
        checked_at: at,
    })
}

fn names(sink: &RecordingSink) -> Vec<&'static str> {
    sink.events().iter().map(|e| e.name()).collect()
}

// ----- 5: transient seals heal by themselves ---------------------------------

#[tokio::test]
async fn a_transient_kms_failure_heals_without_unseal() {
    let r = ring().await;
    let record = r.ring.encrypt(&ctx(), b"kept").await.unwrap();
    r.ring.clear_cache();
    r.kms.fail_with(Some(WrapErrorKind::Unavailable));
    assert!(matches!(
        r.ring.decrypt(&ctx(), &record).await,
        Err(Error::Sealed { .. })
    ));
    // The KMS is back. Before the first probe is due the keyring stays
    // sealed without calling it...
    r.kms.fail_with(None);
    let calls = r.kms.unwraps();
    assert!(r.ring.decrypt(&ctx(), &record).await.is_err());
    assert_eq!(r.kms.unwraps(), calls);
    // ...and once it is due, a use probes, unseals and decrypts: nobody
    // called unseal().
    r.clock.advance(Duration::from_secs(1));
    assert_eq!(r.ring.decrypt(&ctx(), &record).await.unwrap(), b"kept");
    assert!(r.ring.sealed().is_none());
    assert!(names(&r.sink).contains(&"kms.unsealed"));
}

#[tokio::test]
async fn failed_probes_back_off() {
    let r = ring().await;
    let record = r.ring.encrypt(&ctx(), b"kept").await.unwrap();
    r.ring.clear_cache();
    r.kms.fail_with(Some(WrapErrorKind::Throttled));
    assert!(r.ring.decrypt(&ctx(), &record).await.is_err());
    // Probes at +1 s, then +2 s after that, then +4 s: uses in between make
    // no KMS call.
    let mut probes = Vec::new();
    for _ in 0..8 {
        r.clock.advance(Duration::from_secs(1));
        let before = r.kms.unwraps();
        assert!(r.ring.decrypt(&ctx(), &record).await.is_err());
        probes.push(r.kms.unwraps() - before);
    }
    assert_eq!(probes, [1, 0, 1, 0, 0, 0, 1, 0]);
}

#[tokio::test]
async fn an_access_denial_does_not_heal_by_itself() {
    let r = ring().await;
    let record = r.ring.encrypt(&ctx(), b"kept").await.unwrap();
    r.ring.clear_cache();
    r.kms.fail_with(Some(WrapErrorKind::AccessDenied));
    assert!(r.ring.decrypt(&ctx(), &record).await.is_err());
    r.kms.fail_with(None);
    r.clock.advance(Duration::from_secs(120));
    assert!(matches!(
        r.ring.decrypt(&ctx(), &record).await,
        Err(Error::Sealed { .. })
    ));
    r.ring.unseal().await.unwrap();
    assert_eq!(r.ring.decrypt(&ctx(), &record).await.unwrap(), b"kept");
}

#[tokio::test]
async fn an_operators_seal_stops_everything_until_a_manual_unseal() {
    let r = ring().await;
    let record = r.ring.encrypt(&ctx(), b"kept").await.unwrap();
    r.ring.seal("suspected breach", &admin());
    // Even the cached key is refused, and time does not heal it.
    r.clock.advance(Duration::from_secs(3600));
    for result in [
        r.ring.decrypt(&ctx(), &record).await,
        r.ring.encrypt(&ctx(), b"x").await,
    ] {
        match result {
            Err(Error::SealedByOperator { reason, .. }) => {
                assert_eq!(reason, "suspected breach");
            }
            other => panic!("sealed by an operator: {other:?}"),
        }
    }
    assert!(r.ring.metadata().cached_versions.is_empty());
    r.ring.unseal_as(&admin()).await.unwrap();
    assert_eq!(r.ring.decrypt(&ctx(), &record).await.unwrap(), b"kept");
    let n = names(&r.sink);
    assert!(
        n.contains(&"kms.sealed.manual") && n.contains(&"kms.unsealed"),
        "{n:?}"
    );
}

// ----- 6 and 10: grace period, schedule, typed refusals ----------------------

#[tokio::test]
async fn destroy_waits_out_the_grace_period_and_says_until_when() {
    let r = ring().await;
    r.ring.rotate(&admin()).await.unwrap();
    r.ring.disable(1, &admin()).await.unwrap();
    let disabled_at = r.clock.now();
    r.clock.advance(Duration::from_secs(120));
    let allowed = r.ring.destroy_allowed_at(1).unwrap();
    assert_eq!(allowed, disabled_at.saturating_add(GRACE));
    match r
        .ring
        .destroy(1, evidence(1, r.clock.now()), &admin())
        .await
    {
        Err(Error::DestroyRefused {
            version: 1,
            reason: DestroyRefusal::GracePeriod { until, .. },
            allowed_at,
        }) => {
            assert_eq!(until, allowed);
            assert_eq!(allowed_at, Some(allowed));
        }
        other => panic!("within the grace period: {other:?}"),
    }
    // The refusal reads as RFC 3339, not raw seconds.
    let text = r
        .ring
        .destroy(1, evidence(1, r.clock.now()), &admin())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains(&allowed.to_string()) && text.contains('T'),
        "{text}"
    );
    r.clock.advance(GRACE);
    r.ring
        .destroy(1, evidence(1, r.clock.now()), &admin())
        .await
        .unwrap();
    assert_eq!(r.ring.version_state(1), Some(KeyState::Destroyed));
}

#[tokio::test]
async fn evidence_must_postdate_the_disable_and_the_write_window() {
    let r = ring().await;
    r.ring.rotate(&admin()).await.unwrap(); // v1 retired now
    let retired = r.clock.now();
    let settled = retired.saturating_add(Duration::from_secs(30 + 10 + 1));
    r.clock.advance(Duration::from_secs(100));
    let before_disable = r.clock.now();
    r.ring.disable(1, &admin()).await.unwrap();
    r.clock.advance(GRACE);
    // Gathered before the disable: an instance could still have written.
    match r
        .ring
        .destroy(1, evidence(1, before_disable), &admin())
        .await
    {
        Err(Error::DestroyRefused {
            reason: DestroyRefusal::EvidenceTooEarly { needed_after, .. },
            ..
        }) => assert!(needed_after > before_disable),
        other => panic!("evidence before the disable: {other:?}"),
    }
    // A disable right at retirement: max staleness + write window + 1 s.
    let r2 = ring().await;
    r2.ring.rotate(&admin()).await.unwrap();
    r2.ring.disable(1, &admin()).await.unwrap();
    r2.clock.advance(GRACE);
    let just_before = Timestamp(settled.as_secs() - 1);
    assert!(matches!(
        r2.ring.destroy(1, evidence(1, just_before), &admin()).await,
        Err(Error::DestroyRefused {
            reason: DestroyRefusal::EvidenceTooEarly { .. },
            ..
        })
    ));
    r2.ring
        .destroy(1, evidence(1, settled), &admin())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_forced_destroy_needs_a_reason_and_skips_the_grace_period() {
    let r = ring().await;
    r.ring.rotate(&admin()).await.unwrap();
    r.ring.disable(1, &admin()).await.unwrap();
    let forced = |reason: &str| DestroyAuthorization::Forced {
        reason: reason.into(),
    };
    assert!(matches!(
        r.ring.destroy(1, forced("  "), &admin()).await,
        Err(Error::DestroyRefused {
            reason: DestroyRefusal::ForcedWithoutReason,
            ..
        })
    ));
    r.ring
        .destroy(1, forced("key exposed in incident 42"), &admin())
        .await
        .unwrap();
    let events = r.sink.events();
    let last = events.last().unwrap();
    assert!(
        matches!(&last.kind, keyfold_core::AuditKind::StateChanged { forced: true, detail: Some(d), .. } if d.contains("incident 42")),
        "{last:?}"
    );
}

#[tokio::test]
async fn a_scheduled_destroy_is_due_at_its_time_and_enabling_cancels_it() {
    let r = ring().await;
    r.ring.rotate(&admin()).await.unwrap();
    assert!(matches!(
        r.ring
            .schedule_destroy(1, r.clock.now().saturating_add(GRACE), &admin())
            .await,
        Err(Error::DestroyRefused {
            reason: DestroyRefusal::NotDisabled {
                state: KeyState::Retired
            },
            ..
        })
    ));
    r.ring.disable(1, &admin()).await.unwrap();
    let allowed = r.ring.destroy_allowed_at(1).unwrap();
    // Too early: refused with when it may be.
    match r.ring.schedule_destroy(1, r.clock.now(), &admin()).await {
        Err(Error::DestroyRefused { allowed_at, .. }) => assert_eq!(allowed_at, Some(allowed)),
        other => panic!("scheduled inside the grace period: {other:?}"),
    }
    r.ring.schedule_destroy(1, allowed, &admin()).await.unwrap();
    assert!(r.ring.due_destroys().is_empty());
    r.clock.advance(GRACE);
    assert_eq!(r.ring.due_destroys(), [(1, allowed)]);
    assert_eq!(
        r.ring.metadata().versions[0].destroy_scheduled_at,
        Some(allowed)
    );
    // Enabling cancels the schedule.
    r.ring.enable(1, &admin()).await.unwrap();
    assert!(r.ring.due_destroys().is_empty());
    assert_eq!(r.ring.metadata().versions[0].destroy_scheduled_at, None);
    assert!(names(&r.sink).contains(&"kms.destroy.scheduled"));
}

// ----- 9: minimum decryption version -----------------------------------------

#[tokio::test]
async fn a_minimum_decryption_version_disables_older_versions_in_one_audited_change() {
    let r = ring().await;
    for _ in 0..3 {
        r.ring.rotate(&admin()).await.unwrap(); // v4 active
    }
    let before = r.sink.events().len();
    assert_eq!(
        r.ring
            .set_min_decryption_version(3, &admin())
            .await
            .unwrap(),
        [1, 2]
    );
    let new: Vec<_> = r.sink.events()[before..].iter().map(|e| e.name()).collect();
    assert_eq!(new, ["kms.min_decryption_version.set"]);
    assert_eq!(r.ring.version_state(2), Some(KeyState::Disabled));
    assert_eq!(r.ring.version_state(3), Some(KeyState::Retired));
    assert!(matches!(
        r.ring.enable(2, &admin()).await,
        Err(Error::BelowMinDecryptionVersion { version: 2, min: 3 })
    ));
    // The active version cannot be cut off.
    assert!(matches!(
        r.ring.set_min_decryption_version(5, &admin()).await,
        Err(Error::KeyState {
            version: 4,
            state: KeyState::Active
        })
    ));
}

// ----- 4: write window -------------------------------------------------------

#[tokio::test]
async fn a_ciphertext_persisted_late_under_a_retired_version_is_refused() {
    let r = ring().await;
    let pending = r.ring.encrypt_for_write(&ctx(), b"late").await.unwrap();
    assert_eq!(pending.version(), 1);
    // Within the window: fine.
    let fresh = r.ring.encrypt_for_write(&ctx(), b"on time").await.unwrap();
    r.clock.advance(WINDOW);
    assert!(r.ring.ready_to_write(fresh).await.is_ok());
    // Past the window but v1 still active: fine too.
    let still = r.ring.encrypt_for_write(&ctx(), b"still").await.unwrap();
    r.clock.advance(WINDOW * 2);
    assert!(r.ring.ready_to_write(still).await.is_ok());
    // Past the window and v1 retired meanwhile: refused.
    r.ring.rotate(&admin()).await.unwrap();
    match r.ring.ready_to_write(pending).await {
        Err(Error::WriteWindowExpired {
            version: 1, window, ..
        }) => assert_eq!(window, WINDOW),
        other => panic!("late write: {other:?}"),
    }
}

// ----- 7's building block: the stored rotation policy ------------------------

#[tokio::test]
async fn the_rotation_policy_is_stored_and_evaluated_on_any_instance() {
    let r = ring().await;
    r.ring
        .set_rotation_policy(Some(RotationPolicy::new(true, 30).unwrap()), &admin())
        .await
        .unwrap();
    assert!(
        r.ring
            .rotate_if_policy_due(&admin())
            .await
            .unwrap()
            .is_none()
    );
    r.clock.advance(Duration::from_secs(31 * 86_400));
    let rotation = r
        .ring
        .rotate_if_policy_due(&admin())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rotation.version, 2);
    assert!(names(&r.sink).contains(&"kms.rotate.scheduled"));
    assert_eq!(r.ring.rotation_policy().map(|p| p.period_days()), Some(30));
}

// ----- review findings --------------------------------------------------------

#[tokio::test]
async fn a_plain_unseal_never_lifts_an_operators_seal() {
    let r = ring().await;
    r.ring.seal("incident 7", &admin());
    r.ring.unseal().await.unwrap();
    assert!(matches!(
        r.ring.encrypt(&ctx(), b"x").await,
        Err(Error::SealedByOperator { .. })
    ));
    r.ring.unseal_as(&admin()).await.unwrap();
    r.ring.encrypt(&ctx(), b"x").await.unwrap();
}

#[tokio::test]
async fn evidence_dated_in_the_future_is_refused() {
    let r = ring().await;
    r.ring.rotate(&admin()).await.unwrap();
    r.ring.disable(1, &admin()).await.unwrap();
    r.clock.advance(GRACE * 2);
    let future = r.clock.now().saturating_add(Duration::from_secs(600));
    assert!(matches!(
        r.ring.destroy(1, evidence(1, future), &admin()).await,
        Err(Error::DestroyRefused {
            reason: DestroyRefusal::EvidenceFromTheFuture { .. },
            ..
        })
    ));
}

#[tokio::test]
async fn a_minimum_beyond_the_next_version_is_refused() {
    let r = ring().await;
    assert!(matches!(
        r.ring.set_min_decryption_version(u32::MAX, &admin()).await,
        Err(Error::UnknownVersion { .. })
    ));
}

#[tokio::test]
async fn an_absurd_grace_period_is_not_a_zero_one() {
    let kms = CountingWrapper::shared(LocalKek::from_bytes("kek", SecretKey::generate().unwrap()));
    let clock = ManualClock::new(Timestamp(1_800_000_000));
    let ring = Keyring::builder("acme", kms, Arc::new(MemoryStore::new()))
        .clock(Arc::new(clock.clone()))
        .destroy_grace(Duration::MAX)
        .cache_ttl(Duration::MAX)
        .create()
        .await
        .unwrap();
    ring.rotate(&admin()).await.unwrap();
    ring.rotate(&admin()).await.unwrap();
    ring.disable(1, &admin()).await.unwrap();
    clock.advance(Duration::from_secs(365 * 86_400));
    assert!(matches!(
        ring.destroy(1, evidence(1, clock.now()), &admin()).await,
        Err(Error::DestroyRefused {
            reason: DestroyRefusal::GracePeriod { .. },
            ..
        })
    ));
}
