//! Streaming throughput: a 1 GiB object (default; `KEYFOLD_STREAM_MIB`
//! changes it) through the `Write` encryptor into a sink, and 64 MiB objects
//! decrypted repeatedly through the `Read` and `BufRead` decryptors, next to the raw
//! aws-lc-rs AEAD over 64 KiB messages with a prebuilt key. Memory stays
//! bounded by the adapters' segment buffers.
//!
//! `cargo bench -p keyfold-benches --bench stream`

use std::io::{self, Read, Write};

use keyfold_core::stream::{BufDecryptor, Decryptor, Encryptor, StreamOptions};
use keyfold_core::{EncryptionContext, MasterKey, SecretKey};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("stream: bench");
        return;
    }

    use aws_lc_rs::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    use keyfold_core::Suite;
    use std::time::Instant;

    let mib: usize = std::env::var("KEYFOLD_STREAM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let master = MasterKey::new(1, SecretKey::generate().unwrap());
    let ctx = EncryptionContext::new().with("object", "bench");
    let chunk = vec![0x5au8; 1 << 20];
    let seg = 1 << 16;
    for suite in Suite::ALL {
        let algorithm = match suite {
            Suite::ChaCha20Poly1305 => &CHACHA20_POLY1305,
            _ => &AES_256_GCM,
        };
        let key = LessSafeKey::new(UnboundKey::new(algorithm, &[7; 32]).unwrap());
        let nonce = |i: u64| {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&i.to_be_bytes());
            Nonce::assume_unique_for_key(n)
        };
        // Over a 64 MiB buffer, as the stream readers walk memory too.
        let mut data = vec![0x5au8; 64 << 20];
        let rounds = mib.div_ceil(64);
        let start = Instant::now();
        let mut tags = Vec::with_capacity(data.len() / seg);
        for _ in 0..rounds {
            tags.clear();
            for (i, block) in data.chunks_mut(seg).enumerate() {
                tags.push(
                    key.seal_in_place_separate_tag(nonce(i as u64), Aad::from(b"aad"), block)
                        .unwrap(),
                );
            }
        }
        let raw_seal = (rounds * 64) as f64 / start.elapsed().as_secs_f64();
        let mut out = vec![0u8; seg];
        let start = Instant::now();
        for _ in 0..rounds {
            for (i, block) in data.chunks(seg).enumerate() {
                key.open_separate_gather(
                    nonce(i as u64),
                    Aad::from(b"aad"),
                    block,
                    tags[i].as_ref(),
                    &mut out,
                )
                .unwrap();
            }
        }
        let raw_open = (rounds * 64) as f64 / start.elapsed().as_secs_f64();
        drop(data);

        let options = StreamOptions::default().suite(suite);
        let start = Instant::now();
        let mut enc = Encryptor::new(&master, options, &ctx, io::sink()).unwrap();
        for _ in 0..mib {
            enc.write_all(&chunk).unwrap();
        }
        enc.finish().unwrap();
        let seal = mib as f64 / start.elapsed().as_secs_f64();

        // Decrypt a 64 MiB object held in memory, repeatedly.
        let mut object = Vec::new();
        let mut enc = Encryptor::new(&master, options, &ctx, &mut object).unwrap();
        for _ in 0..64 {
            enc.write_all(&chunk).unwrap();
        }
        enc.finish().unwrap();
        let mut out = vec![0u8; 1 << 20];
        let start = Instant::now();
        for _ in 0..mib.div_ceil(64) {
            let mut dec = Decryptor::open(&master, &ctx, &object[..]).unwrap();
            while dec.read(&mut out).unwrap() > 0 {}
        }
        let open = (mib.div_ceil(64) * 64) as f64 / start.elapsed().as_secs_f64();
        // The BufRead adapter opens whole segments straight from the slice.
        let start = Instant::now();
        for _ in 0..mib.div_ceil(64) {
            let mut dec = BufDecryptor::open(&master, &ctx, &object[..]).unwrap();
            while dec.read(&mut out).unwrap() > 0 {}
        }
        let open_buf = (mib.div_ceil(64) * 64) as f64 / start.elapsed().as_secs_f64();
        println!(
            "{suite}: seal raw {raw_seal:.0} MiB/s, stream {seal:.0} MiB/s ({:.2}); open raw {raw_open:.0} MiB/s, stream Read {open:.0} MiB/s ({:.2}), stream BufRead {open_buf:.0} MiB/s ({:.2})",
            seal / raw_seal,
            open / raw_open,
            open_buf / raw_open
        );
    }
}
