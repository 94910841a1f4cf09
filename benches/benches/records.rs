//! Seal / open / rewrap, side by side: keyfold (each suite, each backend),
//! the raw AEAD of each backend with a fixed key (the limit), and with
//! `--features peers` tink-rust's AES256_GCM primitive and the AWS
//! Encryption SDK (raw AES keyring; committing suite without signing, and
//! its default committing + ECDSA suite).
//!
//! `cargo bench -p keyfold-benches --bench records [--features peers]`

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keyfold_core::format;
use keyfold_core::suite::{Backend, TAG_LEN};
use keyfold_core::{EncryptionContext, MasterKey, SecretKey, Suite, record};

const SIZES: [usize; 4] = [64, 1024, 16 * 1024, 1024 * 1024];

fn ctx() -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "acme")
        .with("row", 42u64.to_be_bytes())
}

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::RustCrypto => "rustcrypto",
        _ => "aws-lc",
    }
}

fn suite_name(s: Suite) -> &'static str {
    match s {
        Suite::Aes256Gcm => "aes-256-gcm",
        _ => "chacha20-poly1305",
    }
}

/// The raw AEADs with a fixed, prebuilt key and a counter nonce.
mod raw {
    use aes_gcm::aead::consts::{U12, U16};
    use aes_gcm::aead::inout::InOutBuf;
    use aes_gcm::aead::{AeadInOut, KeyInit};
    use aws_lc_rs::aead::{
        AES_256_GCM, AES_256_GCM_SIV, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
    };

    pub(crate) enum Raw {
        AwsLc(LessSafeKey),
        Aes(Box<aes_gcm::Aes256Gcm>),
        ChaCha(Box<chacha20poly1305::ChaCha20Poly1305>),
    }

    impl Raw {
        pub(crate) fn new(suite: &str, backend: &str) -> Raw {
            let key = [7u8; 32];
            match (suite, backend) {
                ("aes-256-gcm", "aws-lc") => Raw::AwsLc(LessSafeKey::new(
                    UnboundKey::new(&AES_256_GCM, &key).unwrap(),
                )),
                ("aes-256-gcm-siv", "aws-lc") => Raw::AwsLc(LessSafeKey::new(
                    UnboundKey::new(&AES_256_GCM_SIV, &key).unwrap(),
                )),
                ("chacha20-poly1305", "aws-lc") => Raw::AwsLc(LessSafeKey::new(
                    UnboundKey::new(&CHACHA20_POLY1305, &key).unwrap(),
                )),
                ("aes-256-gcm", _) => Raw::Aes(Box::new(aes_gcm::Aes256Gcm::new(&key.into()))),
                _ => Raw::ChaCha(Box::new(chacha20poly1305::ChaCha20Poly1305::new(
                    &key.into(),
                ))),
            }
        }

        pub(crate) fn seal(&self, counter: u64, buf: &mut [u8]) -> [u8; 16] {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            match self {
                Raw::AwsLc(k) => k
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(b"aad"),
                        buf,
                    )
                    .unwrap()
                    .as_ref()
                    .try_into()
                    .unwrap(),
                Raw::Aes(k) => rustcrypto_seal(&**k, nonce, buf.into()),
                Raw::ChaCha(k) => rustcrypto_seal(&**k, nonce, buf.into()),
            }
        }

        /// Seals into a new `Vec` the way `record::encrypt` does: a
        /// zero-filled buffer, sealed into from the plaintext (cheaper here
        /// than copying the plaintext in and sealing in place).
        pub(crate) fn seal_alloc(&self, counter: u64, plaintext: &[u8]) -> Vec<u8> {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            let mut out = vec![0u8; plaintext.len() + 16];
            let (body, tag_out) = out.split_at_mut(plaintext.len());
            let tag: [u8; 16] = match self {
                Raw::AwsLc(k) => {
                    let mut tag = [0u8; 16];
                    k.seal_out_of_place_scatter(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(b"aad"),
                        plaintext,
                        body,
                        &[],
                        &mut tag,
                    )
                    .unwrap();
                    tag
                }
                Raw::Aes(k) => {
                    rustcrypto_seal(&**k, nonce, InOutBuf::new(plaintext, body).unwrap())
                }
                Raw::ChaCha(k) => {
                    rustcrypto_seal(&**k, nonce, InOutBuf::new(plaintext, body).unwrap())
                }
            };
            tag_out.copy_from_slice(&tag);
            out
        }

        /// Opens into a new `Vec`.
        pub(crate) fn open_alloc(&self, counter: u64, ct: &[u8], tag: &[u8; 16]) -> Vec<u8> {
            let mut out = vec![0u8; ct.len()];
            self.open(counter, ct, tag, &mut out);
            out
        }

        pub(crate) fn open(&self, counter: u64, ct: &[u8], tag: &[u8; 16], out: &mut [u8]) {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            match self {
                Raw::AwsLc(k) => k
                    .open_separate_gather(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(b"aad"),
                        ct,
                        tag,
                        out,
                    )
                    .unwrap(),
                Raw::Aes(k) => rustcrypto_open(&**k, nonce, InOutBuf::new(ct, out).unwrap(), tag),
                Raw::ChaCha(k) => {
                    rustcrypto_open(&**k, nonce, InOutBuf::new(ct, out).unwrap(), tag)
                }
            }
        }
    }

    /// Both RustCrypto AEADs have 96-bit nonces and 128-bit tags.
    fn rustcrypto_seal<A>(key: &A, nonce: [u8; 12], buf: InOutBuf<'_, '_, u8>) -> [u8; 16]
    where
        A: AeadInOut<NonceSize = U12, TagSize = U16>,
    {
        key.encrypt_inout_detached(&nonce.into(), b"aad", buf)
            .unwrap()
            .into()
    }

    fn rustcrypto_open<A>(key: &A, nonce: [u8; 12], buf: InOutBuf<'_, '_, u8>, tag: &[u8; 16])
    where
        A: AeadInOut<NonceSize = U12, TagSize = U16>,
    {
        key.decrypt_inout_detached(&nonce.into(), b"aad", buf, tag.into())
            .unwrap();
    }
}

#[cfg(feature = "peers")]
mod peers {
    use std::collections::HashMap;

    use aws_esdk::client as esdk_client;
    use aws_esdk::material_providers::client as mpl_client;
    use aws_esdk::material_providers::types::material_providers_config::MaterialProvidersConfig;
    use aws_esdk::material_providers::types::{AesWrappingAlg, EsdkAlgorithmSuiteId};
    use aws_esdk::types::aws_encryption_sdk_config::AwsEncryptionSdkConfig;

    pub(crate) struct Tink(pub(crate) Box<dyn tink_core::Aead>);

    impl Tink {
        pub(crate) fn new() -> Tink {
            tink_aead::init();
            let handle =
                tink_core::keyset::Handle::new(&tink_aead::aes256_gcm_key_template()).unwrap();
            Tink(tink_aead::new(&handle).unwrap())
        }
    }

    pub(crate) struct Esdk {
        pub(crate) rt: tokio::runtime::Runtime,
        client: esdk_client::Client,
        keyring: aws_esdk::material_providers::types::keyring::KeyringRef,
        context: HashMap<String, String>,
    }

    impl Esdk {
        pub(crate) fn new() -> Esdk {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (client, keyring) = rt.block_on(async {
                let client = esdk_client::Client::from_conf(
                    AwsEncryptionSdkConfig::builder().build().unwrap(),
                )
                .unwrap();
                let mpl = mpl_client::Client::from_conf(
                    MaterialProvidersConfig::builder().build().unwrap(),
                )
                .unwrap();
                let keyring = mpl
                    .create_raw_aes_keyring()
                    .key_name("bench")
                    .key_namespace("keyfold-bench")
                    .wrapping_key(vec![9u8; 32])
                    .wrapping_alg(AesWrappingAlg::AlgAes256GcmIv12Tag16)
                    .send()
                    .await
                    .unwrap();
                (client, keyring)
            });
            let context = HashMap::from([("tenant".to_owned(), "acme".to_owned())]);
            Esdk {
                rt,
                client,
                keyring,
                context,
            }
        }

        pub(crate) fn encrypt(&self, pt: &[u8], signing: bool) -> aws_smithy_types::Blob {
            let suite = if signing {
                EsdkAlgorithmSuiteId::AlgAes256GcmHkdfSha512CommitKeyEcdsaP384
            } else {
                EsdkAlgorithmSuiteId::AlgAes256GcmHkdfSha512CommitKey
            };
            self.rt.block_on(async {
                self.client
                    .encrypt()
                    .plaintext(pt.to_vec())
                    .keyring(self.keyring.clone())
                    .encryption_context(self.context.clone())
                    .algorithm_suite_id(suite)
                    .send()
                    .await
                    .unwrap()
                    .ciphertext
                    .unwrap()
            })
        }

        pub(crate) fn decrypt(&self, ct: &aws_smithy_types::Blob) -> aws_smithy_types::Blob {
            self.rt.block_on(async {
                self.client
                    .decrypt()
                    .ciphertext(ct.clone())
                    .keyring(self.keyring.clone())
                    .encryption_context(self.context.clone())
                    .send()
                    .await
                    .unwrap()
                    .plaintext
                    .unwrap()
            })
        }
    }
}

fn seal_open(c: &mut Criterion) {
    let master = MasterKey::new(1, SecretKey::generate().unwrap());
    let context = ctx();
    #[cfg(feature = "peers")]
    let (tink, esdk) = (peers::Tink::new(), peers::Esdk::new());
    for op in ["seal", "open"] {
        let mut group = c.benchmark_group(op);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let plaintext = vec![0x42u8; size];
            for suite in Suite::ALL {
                for &backend in Backend::all() {
                    let id = BenchmarkId::new(
                        format!("keyfold/{}/{}", suite_name(suite), backend_name(backend)),
                        size,
                    );
                    let ct = record::encrypt_with(backend, &master, suite, &context, &plaintext)
                        .unwrap();
                    group.bench_with_input(id, &size, |b, _| match op {
                        "seal" => b.iter(|| {
                            record::encrypt_with(
                                backend,
                                &master,
                                suite,
                                &context,
                                black_box(&plaintext),
                            )
                            .unwrap()
                        }),
                        _ => b.iter(|| {
                            record::decrypt_with(backend, &master, &context, black_box(&ct))
                                .unwrap()
                        }),
                    });
                    if backend == Backend::default() {
                        // The in-place API on the default backend: no
                        // allocation, no copy, like the raw rows.
                        let id = BenchmarkId::new(
                            format!(
                                "keyfold-in-place/{}/{}",
                                suite_name(suite),
                                backend_name(backend)
                            ),
                            size,
                        );
                        let mut laid_out = vec![0u8; format::HEADER_LEN];
                        laid_out.extend_from_slice(&plaintext);
                        laid_out.extend_from_slice(&[0u8; TAG_LEN]);
                        group.bench_with_input(id, &size, |b, _| match op {
                            "seal" => b.iter(|| {
                                record::encrypt_in_place(
                                    &master,
                                    suite,
                                    &context,
                                    black_box(&mut laid_out),
                                )
                                .unwrap()
                            }),
                            _ => b.iter_batched_ref(
                                || ct.clone(),
                                |record| {
                                    record::decrypt_in_place(&master, &context, record)
                                        .map(|p| p.len())
                                        .unwrap()
                                },
                                BatchSize::LargeInput,
                            ),
                        });
                    }
                    let raw = raw::Raw::new(suite_name(suite), backend_name(backend));
                    let id = BenchmarkId::new(
                        format!("raw/{}/{}", suite_name(suite), backend_name(backend)),
                        size,
                    );
                    let mut buf = plaintext.clone();
                    let tag = raw.seal(1, &mut buf);
                    let sealed = buf.clone();
                    let mut counter = 0u64;
                    group.bench_with_input(id, &size, |b, _| match op {
                        "seal" => b.iter(|| {
                            counter += 1;
                            raw.seal(counter, black_box(&mut buf))
                        }),
                        _ => b.iter(|| raw.open(1, black_box(&sealed), &tag, &mut buf)),
                    });
                    // The bare AEAD returning a new buffer: the like-for-like
                    // limit for the allocating `keyfold/…` rows.
                    let id = BenchmarkId::new(
                        format!("raw-alloc/{}/{}", suite_name(suite), backend_name(backend)),
                        size,
                    );
                    group.bench_with_input(id, &size, |b, _| match op {
                        "seal" => b.iter(|| {
                            counter += 1;
                            raw.seal_alloc(counter, black_box(&plaintext))
                        }),
                        _ => b.iter(|| raw.open_alloc(1, black_box(&sealed), &tag)),
                    });
                }
            }
            #[cfg(feature = "peers")]
            {
                let tct = tink.0.encrypt(&plaintext, b"aad").unwrap();
                group.bench_with_input(
                    BenchmarkId::new("tink-rust/aes256-gcm", size),
                    &size,
                    |b, _| match op {
                        "seal" => b.iter(|| tink.0.encrypt(black_box(&plaintext), b"aad").unwrap()),
                        _ => b.iter(|| tink.0.decrypt(black_box(&tct), b"aad").unwrap()),
                    },
                );
                for (name, signing) in [("aws-esdk/commit", false), ("aws-esdk/commit-ecdsa", true)]
                {
                    if signing && size > 16 * 1024 && op == "open" {
                        // Same per-byte cost as without signing; keep the run short.
                    }
                    let ect = esdk.encrypt(&plaintext, signing);
                    group.bench_with_input(BenchmarkId::new(name, size), &size, |b, _| match op {
                        "seal" => b.iter(|| esdk.encrypt(black_box(&plaintext), signing)),
                        _ => b.iter(|| esdk.decrypt(black_box(&ect))),
                    });
                }
            }
        }
        group.finish();
    }
}

fn rewrap(c: &mut Criterion) {
    let v1 = MasterKey::new(1, SecretKey::generate().unwrap());
    let v2 = MasterKey::new(2, SecretKey::generate().unwrap());
    let context = ctx();
    let mut group = c.benchmark_group("rotate");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for size in [1024usize, 1024 * 1024] {
        group.throughput(Throughput::Elements(1));
        let ct = record::encrypt(&v1, Suite::Aes256Gcm, &context, &vec![1u8; size]).unwrap();
        let mut buf = ct.clone();
        let mut on_v1 = true;
        // Back and forth between v1 and v2, in place: no copy of the record.
        group.bench_with_input(
            BenchmarkId::new("rewrap-header-in-place", size),
            &size,
            |b, _| {
                b.iter(|| {
                    let (from, to) = if on_v1 { (&v1, &v2) } else { (&v2, &v1) };
                    record::rewrap_in_place(black_box(&mut buf), from, to, &context).unwrap();
                    on_v1 = !on_v1;
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("reencrypt", size), &size, |b, _| {
            b.iter(|| record::reencrypt(black_box(&ct), &v1, &v2, &context).unwrap())
        });
    }
    group.finish();
}

/// What the rewrap job spends on one row besides the database, with the
/// rewrap-postgres bench's row shape (a 31-byte secret, a three-entry
/// context): the old version's key from the keyring (a cache hit), then the
/// rewrap and the verifying open; and the limit, the two wrap AEAD calls a
/// header rewrap cannot do without (open under the old key, seal under the
/// new), on a fixed key.
fn job_row(c: &mut Criterion) {
    use keyfold_core::LocalKek;
    use keyfold_core::audit::Actor;
    use keyfold_core::keyring::Keyring;
    use keyfold_core::store::MemoryStore;
    use std::sync::Arc;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kek = Arc::new(LocalKek::from_bytes(
        "bench",
        SecretKey::generate().unwrap(),
    ));
    let ring = rt.block_on(async {
        let ring = Keyring::builder("tenant", kek, Arc::new(MemoryStore::new()))
            .create()
            .await
            .unwrap();
        ring.rotate(&Actor::new("bench")).await.unwrap();
        ring.rotate(&Actor::new("bench")).await.unwrap();
        ring
    });
    let (v1, v2) = rt.block_on(async {
        (
            ring.master_key(1).await.unwrap(),
            ring.master_key(2).await.unwrap(),
        )
    });
    let context = EncryptionContext::new()
        .with("row", "123456")
        .with("tenant", "tenant-6")
        .with("table", "accounts");
    let ct = record::encrypt(
        &v1,
        Suite::Aes256Gcm,
        &context,
        b"secret number 123456 of the job",
    )
    .unwrap();

    let mut group = c.benchmark_group("job-row");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(1));
    group.bench_function("master_key (cache hit)", |b| {
        b.iter(|| rt.block_on(ring.master_key(black_box(1))).unwrap())
    });
    group.bench_function("rewrap + verifying decrypt", |b| {
        b.iter(|| {
            let new = record::rewrap(black_box(&ct), &v1, &v2, &context).unwrap();
            drop(record::decrypt(&v2, &context, &new).unwrap());
            new
        })
    });
    group.bench_function("rewrap_verified", |b| {
        b.iter(|| record::rewrap_verified(black_box(&ct), &v1, &v2, &context).unwrap())
    });
    let limit = raw::Raw::new("aes-256-gcm-siv", "aws-lc");
    let mut wrapped = [3u8; 32];
    group.bench_function("limit: wrap open + seal (raw GCM-SIV)", |b| {
        b.iter(|| {
            let tag = limit.seal(1, black_box(&mut wrapped));
            let mut out = [0u8; 32];
            limit.open(1, &wrapped, &tag, &mut out);
            out
        })
    });
    let siv = {
        use aes_gcm_siv::aead::KeyInit;
        aes_gcm_siv::Aes256GcmSiv::new(&[7u8; 32].into())
    };
    group.bench_function("limit: wrap open + seal (raw GCM-SIV, RustCrypto)", |b| {
        use aes_gcm_siv::aead::AeadInOut;
        let nonce = [1u8; 12];
        b.iter(|| {
            let tag = siv
                .encrypt_inout_detached((&nonce).into(), b"aad", black_box(&mut wrapped[..]).into())
                .unwrap();
            let mut out = [0u8; 32];
            let buf = aes_gcm_siv::aead::inout::InOutBuf::new(&wrapped[..], &mut out[..]).unwrap();
            siv.decrypt_inout_detached((&nonce).into(), b"aad", buf, &tag)
                .unwrap();
            out
        })
    });
    // The verifying open's payload part: a single-use key set up and a
    // 31-byte payload opened, on each backend.
    let payload = [5u8; 31];
    for backend in ["aws-lc", "rustcrypto"] {
        let sealer = raw::Raw::new("aes-256-gcm", backend);
        let mut ct = payload;
        let tag = sealer.seal(0, &mut ct);
        group.bench_function(format!("payload key setup + open 31 B ({backend})"), |b| {
            b.iter(|| {
                let fresh = raw::Raw::new("aes-256-gcm", black_box(backend));
                let mut out = [0u8; 31];
                fresh.open(0, &ct, &tag, &mut out);
                out
            })
        });
    }
    group.finish();
}

criterion_group!(benches, seal_open, rewrap, job_row);
criterion_main!(benches);
