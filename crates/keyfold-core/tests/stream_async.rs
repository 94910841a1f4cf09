//! The tokio adapters (feature `async-io`): round trips through a small
//! in-memory pipe (so reads and writes return `Pending` and partial
//! counts), cross-compatibility with the sync adapters, tampering.
#![cfg(feature = "async-io")]

use std::io::Write;

use keyfold_core::error::StreamError;
use keyfold_core::format::STREAM_HEADER_LEN;
use keyfold_core::stream::{self, AsyncDecryptor, AsyncEncryptor, StreamOptions};
use keyfold_core::{CryptoError as Error, EncryptionContext, MasterKey, SecretKey, Suite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn key() -> MasterKey {
    MasterKey::new(5, SecretKey::generate().unwrap())
}

fn ctx() -> EncryptionContext {
    EncryptionContext::new().with("object", "async")
}

fn plain(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 13 + i / 255) as u8).collect()
}

/// Encrypts into one end of a 100-byte duplex pipe while decrypting from
/// the other, concurrently.
async fn pipe_round_trip(master: &MasterKey, options: StreamOptions, pt: &[u8]) -> Vec<u8> {
    let (writer, reader) = tokio::io::duplex(100);
    let write = async {
        let mut enc = AsyncEncryptor::new(master, options, &ctx(), writer).unwrap();
        for piece in pt.chunks(77) {
            enc.write_all(piece).await.unwrap();
        }
        enc.shutdown().await.unwrap();
    };
    let read = async {
        let mut dec = AsyncDecryptor::open(master, &ctx(), reader).await.unwrap();
        let mut out = Vec::new();
        dec.read_to_end(&mut out).await.unwrap();
        out
    };
    let ((), out) = tokio::join!(write, read);
    out
}

#[tokio::test]
async fn async_round_trips_around_segment_boundaries_for_both_suites() {
    let master = key();
    for suite in Suite::ALL {
        for seg in [64usize, 1000] {
            let options = StreamOptions::default()
                .suite(suite)
                .segment_size(seg as u32);
            for n in [0, 1, seg - 1, seg, seg + 1, 5 * seg + 3] {
                let pt = plain(n);
                assert_eq!(
                    pipe_round_trip(&master, options, &pt).await,
                    pt,
                    "{suite} {seg} {n}"
                );
            }
        }
    }
}

#[tokio::test]
async fn async_and_sync_adapters_read_each_other() {
    let master = key();
    let options = StreamOptions::default().segment_size(64);
    let pt = plain(1000);

    let mut enc = AsyncEncryptor::new(&master, options, &ctx(), Vec::new()).unwrap();
    enc.write_all(&pt).await.unwrap();
    enc.shutdown().await.unwrap();
    let object = enc.into_inner();
    let mut out = Vec::new();
    stream::decrypt(&master, &ctx(), &object[..], &mut out).unwrap();
    assert_eq!(out, pt);

    let mut enc = stream::Encryptor::new(&master, options, &ctx(), Vec::new()).unwrap();
    enc.write_all(&pt).unwrap();
    let object = enc.finish().unwrap();
    let mut dec = AsyncDecryptor::open(&master, &ctx(), &object[..])
        .await
        .unwrap();
    let mut out = Vec::new();
    dec.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, pt);
    assert!(dec.buffered_capacity() <= 2 * 64 + 16 + STREAM_HEADER_LEN);
}

#[tokio::test]
async fn async_reader_rejects_truncation_and_tampering() {
    let master = key();
    let options = StreamOptions::default().segment_size(64);
    let mut enc = AsyncEncryptor::new(&master, options, &ctx(), Vec::new()).unwrap();
    enc.write_all(&plain(300)).await.unwrap();
    // Without shutdown the final segment is never written.
    let unfinished = enc.into_inner();
    let mut dec = AsyncDecryptor::open(&master, &ctx(), &unfinished[..])
        .await
        .unwrap();
    let err = dec.read_to_end(&mut Vec::new()).await.unwrap_err();
    assert!(matches!(
        Error::from(err),
        Error::Stream(StreamError::Truncated { segments: 4 })
    ));

    let mut enc = AsyncEncryptor::new(&master, options, &ctx(), Vec::new()).unwrap();
    enc.write_all(&plain(300)).await.unwrap();
    enc.shutdown().await.unwrap();
    let mut object = enc.into_inner();
    object[STREAM_HEADER_LEN + 100] ^= 4;
    let mut dec = AsyncDecryptor::open(&master, &ctx(), &object[..])
        .await
        .unwrap();
    let mut out = Vec::new();
    let err = dec.read_to_end(&mut out).await.unwrap_err();
    assert!(matches!(
        Error::from(err),
        Error::Stream(StreamError::Segment { index: 1 })
    ));
    // Only segment 0 was released.
    assert_eq!(out, plain(64));

    assert!(matches!(
        AsyncDecryptor::open(&master, &EncryptionContext::new(), &object[..]).await,
        Err(Error::Decrypt)
    ));
    assert!(matches!(
        AsyncDecryptor::open(&master, &ctx(), &object[..50]).await,
        Err(Error::Format(_))
    ));
}
