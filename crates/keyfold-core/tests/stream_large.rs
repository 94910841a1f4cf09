//! A large object streamed end to end through an OS pipe: generated on the
//! fly, encrypted by one thread, decrypted and checked by another, never
//! held in memory. The adapters' own buffer accounting bounds their memory.
//!
//! Size: `KEYFOLD_STREAM_TEST_MIB` (default 1024, i.e. 1 GiB).

use std::io::{self, Read, Write};
use std::thread;

use keyfold_core::format::STREAM_HEADER_LEN;
use keyfold_core::stream::{Decryptor, Encryptor, StreamOptions, ciphertext_len};
use keyfold_core::{EncryptionContext, MasterKey, SecretKey};

/// Deterministic plaintext: 64 KiB blocks, each a fixed pattern stamped with
/// its block number, so a misplaced block is caught.
struct Generator {
    remaining: u64,
    offset: u64,
    template: Vec<u8>,
}

const BLOCK: usize = 1 << 16;

impl Generator {
    fn new(len: u64) -> Self {
        Generator {
            remaining: len,
            offset: 0,
            template: (0..BLOCK).map(|i| (i * 31 + 7) as u8).collect(),
        }
    }
}

impl Read for Generator {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let within = (self.offset % BLOCK as u64) as usize;
        let n = buf
            .len()
            .min(BLOCK - within)
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let out = &mut buf[..n];
        out.copy_from_slice(&self.template[within..within + n]);
        // Stamp the block number over the block's first 8 bytes.
        let stamp = (self.offset / BLOCK as u64).to_be_bytes();
        if within < 8 {
            let k = (8 - within).min(n);
            out[..k].copy_from_slice(&stamp[within..within + k]);
        }
        self.offset += n as u64;
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[test]
fn a_large_object_streams_in_bounded_memory() {
    let mib: u64 = std::env::var("KEYFOLD_STREAM_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let len = mib << 20;
    let master = MasterKey::new(1, SecretKey::generate().unwrap());
    let ctx = EncryptionContext::new().with("object", "big");
    let options = StreamOptions::default();
    let seg = options.get_segment_size() as usize;

    let (reader, writer) = io::pipe().unwrap();
    let key = master.secret().duplicate();
    let enc_ctx = ctx.clone();
    let encrypting = thread::spawn(move || {
        let master = MasterKey::new(1, key);
        let counting = Counting {
            inner: writer,
            n: 0,
        };
        let mut enc = Encryptor::new(&master, options, &enc_ctx, counting).unwrap();
        let capacity = enc.buffered_capacity();
        assert!(capacity <= seg + 16 + STREAM_HEADER_LEN, "{capacity}");
        let mut generator = Generator::new(len);
        let mut buf = vec![0u8; 1 << 18];
        loop {
            let n = generator.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            enc.write_all(&buf[..n]).unwrap();
        }
        assert_eq!(enc.buffered_capacity(), capacity, "constant memory");
        enc.finish().unwrap().n
    });

    let mut dec = Decryptor::open(&master, &ctx, reader).unwrap();
    let capacity = dec.buffered_capacity();
    assert!(capacity <= 2 * seg + 16 + STREAM_HEADER_LEN, "{capacity}");
    let mut expected = Generator::new(len);
    let mut got = vec![0u8; 100_000];
    let mut want = vec![0u8; 100_000];
    let mut total = 0u64;
    loop {
        let n = dec.read(&mut got).unwrap();
        if n == 0 {
            break;
        }
        expected.read_exact(&mut want[..n]).unwrap();
        assert!(got[..n] == want[..n], "mismatch near offset {total}");
        total += n as u64;
    }
    assert_eq!(dec.buffered_capacity(), capacity, "constant memory");
    assert_eq!(total, len);
    let written = encrypting.join().unwrap();
    assert_eq!(Some(written), ciphertext_len(len, seg as u32));
}

struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: io::Write> io::Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
