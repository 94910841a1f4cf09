//! Record format v1 behaviour, as a user of the format sees it.

use keyfold_core::format::{self, RECORD_OVERHEAD};
use keyfold_core::{
    CryptoError as Error, EncryptionContext, FormatError, MasterKey, SecretKey, Suite, record,
};
use proptest::prelude::*;

fn master(version: u32) -> MasterKey {
    MasterKey::new(version, SecretKey::generate().unwrap())
}

fn ctx(tenant: &str, row: u64) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", tenant)
        .with("row", row.to_be_bytes())
}

#[test]
fn round_trip_every_suite() {
    let key = master(3);
    for suite in Suite::ALL {
        let ct = record::encrypt(&key, suite, &ctx("a", 1), b"secret").unwrap();
        assert_eq!(ct.len(), 6 + RECORD_OVERHEAD);
        let info = format::inspect(&ct).unwrap();
        assert_eq!(
            (info.suite, info.key_version, info.plaintext_len),
            (suite, 3, 6)
        );
        assert_eq!(record::decrypt(&key, &ctx("a", 1), &ct).unwrap(), b"secret");
    }
}

#[test]
fn a_record_moved_to_another_row_or_tenant_fails() {
    let key = master(1);
    let ct = record::encrypt(&key, Suite::default(), &ctx("a", 1), b"x").unwrap();
    for other in [ctx("a", 2), ctx("b", 1), EncryptionContext::new()] {
        assert!(matches!(
            record::decrypt(&key, &other, &ct),
            Err(Error::Decrypt)
        ));
    }
}

#[test]
fn editing_the_version_field_fails() {
    let v1 = master(1);
    let ct = record::encrypt(&v1, Suite::default(), &ctx("a", 1), b"x").unwrap();
    let mut edited = ct.clone();
    edited[39] = 2;
    // The reader now asks for version 2: with v1's key it is a version mismatch...
    assert!(matches!(
        record::decrypt(&v1, &ctx("a", 1), &edited),
        Err(Error::VersionMismatch {
            record: 2,
            supplied: 1
        })
    ));
    // ...and with v1's key bytes relabelled as version 2 the wrap's AAD no longer matches.
    let relabelled = MasterKey::new(2, v1.secret().duplicate());
    assert!(matches!(
        record::decrypt(&relabelled, &ctx("a", 1), &edited),
        Err(Error::Decrypt)
    ));
}

#[test]
fn rewrap_changes_only_the_wrap_and_keeps_the_payload() {
    let (v1, v2) = (master(1), master(2));
    let c = ctx("a", 9);
    let old = record::encrypt(&v1, Suite::ChaCha20Poly1305, &c, &[7u8; 4096]).unwrap();
    let new = record::rewrap(&old, &v1, &v2, &c).unwrap();
    assert_eq!(old.len(), new.len());
    assert_eq!(old[..36], new[..36], "immutable header changed");
    assert_eq!(
        old[format::HEADER_LEN..],
        new[format::HEADER_LEN..],
        "payload changed"
    );
    assert_eq!(format::inspect(&new).unwrap().key_version, 2);
    assert_eq!(record::decrypt(&v2, &c, &new).unwrap(), vec![7u8; 4096]);
    assert!(matches!(
        record::decrypt(&v1, &c, &new),
        Err(Error::VersionMismatch { .. })
    ));
    // The wrong `from` key leaves the buffer untouched.
    let mut buf = new.clone();
    assert!(record::rewrap_in_place(&mut buf, &v1, &v2, &c).is_err());
    assert_eq!(buf, new);
    // Rewrapping with the wrong context fails (the wrap is bound to it).
    assert!(record::rewrap(&old, &v1, &v2, &ctx("a", 10)).is_err());
}

#[test]
fn rewrap_keeps_the_wrap_nonce_so_a_round_trip_restores_the_record() {
    let (v1, v2) = (master(1), master(2));
    let c = ctx("a", 3);
    let old = record::encrypt(&v1, Suite::Aes256Gcm, &c, b"row").unwrap();
    let nonce = 40..52;
    let there = record::rewrap(&old, &v1, &v2, &c).unwrap();
    assert_eq!(old[nonce.clone()], there[nonce]);
    assert_ne!(old[52..100], there[52..100], "the wrapped key is resealed");
    // Same key, nonce and input give the same bytes (GCM-SIV is
    // deterministic given its nonce): rolling back is exact.
    assert_eq!(record::rewrap(&there, &v2, &v1, &c).unwrap(), old);
}

#[test]
fn reencrypt_uses_a_fresh_data_key() {
    let (v1, v2) = (master(1), master(2));
    let c = ctx("a", 1);
    let old = record::encrypt(&v1, Suite::Aes256Gcm, &c, b"payload").unwrap();
    let new = record::reencrypt(&old, &v1, &v2, &c).unwrap();
    assert_ne!(old[4..36], new[4..36], "commitment (so data key) unchanged");
    assert_ne!(old[format::HEADER_LEN..], new[format::HEADER_LEN..]);
    assert_eq!(record::decrypt(&v2, &c, &new).unwrap(), b"payload");
}

#[test]
fn a_record_does_not_decrypt_under_another_key_of_the_same_version() {
    let c = ctx("a", 1);
    let ct = record::encrypt(&master(1), Suite::default(), &c, b"x").unwrap();
    assert!(matches!(
        record::decrypt(&master(1), &c, &ct),
        Err(Error::Decrypt)
    ));
}

#[test]
fn each_malformed_input_has_a_distinct_error() {
    let ct = record::encrypt(&master(1), Suite::default(), &ctx("a", 1), b"x").unwrap();
    type Check = fn(&FormatError) -> bool;
    let cases: [(Vec<u8>, Check); 5] = [
        (vec![], |e| matches!(e, FormatError::TooShort { .. })),
        (b"XX\x01\x01".to_vec(), |e| {
            matches!(e, FormatError::BadMagic)
        }),
        ([&ct[..2], &[9], &ct[3..]].concat(), |e| {
            matches!(e, FormatError::UnknownVersion(9))
        }),
        ([&ct[..3], &[0x55], &ct[4..]].concat(), |e| {
            matches!(e, FormatError::UnknownSuite(0x55))
        }),
        (ct[..RECORD_OVERHEAD - 1].to_vec(), |e| {
            matches!(e, FormatError::TooShort { .. })
        }),
    ];
    for (bytes, check) in cases {
        match record::decrypt(&master(1), &ctx("a", 1), &bytes) {
            Err(Error::Format(e)) => assert!(check(&e), "{e:?}"),
            other => panic!("expected a format error, got {other:?}"),
        }
    }
}

fn any_context() -> impl Strategy<Value = EncryptionContext> {
    proptest::collection::btree_map(
        "[a-z]{0,8}",
        proptest::collection::vec(any::<u8>(), 0..16),
        0..4,
    )
    .prop_map(|m| m.into_iter().collect())
}

fn any_suite() -> impl Strategy<Value = Suite> {
    prop_oneof![Just(Suite::Aes256Gcm), Just(Suite::ChaCha20Poly1305)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn prop_round_trip(
        pt in proptest::collection::vec(any::<u8>(), 0..2048),
        c in any_context(),
        version in any::<u32>(),
        suite in any_suite(),
    ) {
        let key = master(version);
        let ct = record::encrypt(&key, suite, &c, &pt).unwrap();
        prop_assert_eq!(format::inspect(&ct).unwrap().key_version, version);
        prop_assert_eq!(record::decrypt(&key, &c, &ct).unwrap(), pt);
    }

    #[test]
    fn prop_every_bit_flip_and_truncation_is_rejected(
        pt in proptest::collection::vec(any::<u8>(), 0..24),
        c in any_context(),
        suite in any_suite(),
    ) {
        let key = master(5);
        let ct = record::encrypt(&key, suite, &c, &pt).unwrap();
        for bit in 0..ct.len() * 8 {
            let mut bad = ct.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(record::decrypt(&key, &c, &bad).is_err(), "bit {} accepted", bit);
        }
        for len in 0..ct.len() {
            prop_assert!(record::decrypt(&key, &c, &ct[..len]).is_err(), "truncation to {} accepted", len);
        }
        let mut longer = ct.clone();
        longer.push(0);
        prop_assert!(record::decrypt(&key, &c, &longer).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn prop_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = format::inspect(&bytes);
        let _ = record::decrypt(&master(1), &EncryptionContext::new(), &bytes);
    }

    #[test]
    fn prop_parser_never_panics_on_near_valid_headers(
        tail in proptest::collection::vec(any::<u8>(), 0..200),
        suite in 0u8..4,
    ) {
        let bytes = [&b"KF\x01"[..], &[suite], &tail].concat();
        let _ = format::inspect(&bytes);
        let _ = record::decrypt(&master(1), &EncryptionContext::new(), &bytes);
    }
}

#[test]
fn in_place_encrypt_and_decrypt_match_the_allocating_ones() {
    let (v1, v2) = (master(1), master(2));
    let c = ctx("a", 5);
    for suite in Suite::ALL {
        for len in [0usize, 1, 1000, 70_000] {
            let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = vec![0xEE; format::HEADER_LEN];
            buf.extend_from_slice(&pt);
            buf.extend_from_slice(&[0xEE; 16]);
            record::encrypt_in_place(&v1, suite, &c, &mut buf).unwrap();
            assert_eq!(buf.len(), len + RECORD_OVERHEAD);
            assert_eq!(record::decrypt(&v1, &c, &buf).unwrap(), pt, "{suite} {len}");
            let sealed = record::encrypt(&v1, suite, &c, &pt).unwrap();
            let mut copy = sealed.clone();
            assert_eq!(
                record::decrypt_in_place(&v1, &c, &mut copy).unwrap(),
                &pt[..]
            );

            // Wrong version: refused before anything is touched.
            let mut untouched = sealed.clone();
            assert!(matches!(
                record::decrypt_in_place(&v2, &c, &mut untouched),
                Err(Error::VersionMismatch { .. })
            ));
            assert_eq!(untouched, sealed);
            // Wrong context, or a header whose commitment was changed: the
            // wrap refuses before the payload is touched.
            assert!(matches!(
                record::decrypt_in_place(&v1, &ctx("a", 6), &mut untouched),
                Err(Error::Decrypt)
            ));
            let mut recommitted = sealed.clone();
            recommitted[10] ^= 1;
            let before = recommitted.clone();
            assert!(matches!(
                record::decrypt_in_place(&v1, &c, &mut recommitted),
                Err(Error::Decrypt)
            ));
            assert_eq!(untouched, sealed);
            assert_eq!(recommitted, before);
            // A flipped payload bit: refused, and no unauthenticated byte left.
            if len > 0 {
                let mut bad = sealed.clone();
                bad[format::HEADER_LEN] ^= 1;
                assert!(matches!(
                    record::decrypt_in_place(&v1, &c, &mut bad),
                    Err(Error::Decrypt)
                ));
                assert!(
                    bad[format::HEADER_LEN..bad.len() - 16]
                        .iter()
                        .all(|&b| b == 0)
                );
            }
        }
    }
    let mut short = vec![0u8; RECORD_OVERHEAD - 1];
    assert!(matches!(
        record::encrypt_in_place(&v1, Suite::default(), &c, &mut short),
        Err(Error::Format(_))
    ));
}
