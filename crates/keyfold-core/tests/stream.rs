//! Streaming format: round trips, tampering of every kind, random access,
//! header-only rotation (docs/FORMAT.md, "Streaming").

use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};

use keyfold_core::error::StreamError;
use keyfold_core::format::{self, HeaderKind, STREAM_HEADER_LEN};
use keyfold_core::stream::{
    self, Decryptor, Encryptor, SeekDecryptor, StreamHeader, StreamOptions, ciphertext_len,
};
use keyfold_core::{
    CryptoError as Error, EncryptionContext, FormatError, MasterKey, SecretKey, Suite, record,
};
use proptest::prelude::*;

const SEG: usize = 64;
const FULL: usize = SEG + 16;

fn key(version: u32) -> MasterKey {
    MasterKey::new(version, SecretKey::generate().unwrap())
}

fn ctx() -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "acme")
        .with("object", "backup-1")
}

fn plain(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Encrypts through the `Write` adapter in writes of `chunk` bytes.
fn seal(master: &MasterKey, options: StreamOptions, pt: &[u8], chunk: usize) -> Vec<u8> {
    let mut enc = Encryptor::new(master, options, &ctx(), Vec::new()).unwrap();
    for piece in pt.chunks(chunk.max(1)) {
        enc.write_all(piece).unwrap();
    }
    enc.finish().unwrap()
}

/// Decrypts through the `Read` adapter with reads of `chunk` bytes.
fn open_with(
    master: &MasterKey,
    context: &EncryptionContext,
    object: &[u8],
    chunk: usize,
) -> Result<Vec<u8>, Error> {
    let mut dec = Decryptor::open(master, context, object)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk.max(1)];
    loop {
        let n = dec.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Decrypts through the `BufRead` adapter with reads of `chunk` bytes.
fn open_buffered<R: io::BufRead>(
    master: &MasterKey,
    source: R,
    chunk: usize,
) -> Result<Vec<u8>, Error> {
    let mut dec = stream::BufDecryptor::open(master, &ctx(), source)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = dec.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Decrypts through the `Read` adapter, and checks that the `BufRead` one
/// gives the same plaintext or the same error whichever path it takes:
/// whole segments borrowed from a slice, into the caller's buffer or its
/// own, or copied from a `BufReader` too small to hold a segment.
fn open(master: &MasterKey, object: &[u8]) -> Result<Vec<u8>, Error> {
    let expected = open_with(master, &ctx(), object, 1000);
    for (path, got) in [
        ("slice, big reads", open_buffered(master, object, 1000)),
        ("slice, small reads", open_buffered(master, object, 7)),
        (
            "small BufReader",
            open_buffered(master, io::BufReader::with_capacity(33, object), 1000),
        ),
    ] {
        assert_eq!(format!("{got:?}"), format!("{expected:?}"), "{path}");
    }
    expected
}

fn small(suite: Suite) -> StreamOptions {
    StreamOptions::default()
        .suite(suite)
        .segment_size(SEG as u32)
}

#[test]
fn round_trips_around_segment_boundaries_for_both_suites() {
    let master = key(1);
    for suite in Suite::ALL {
        for seg in [SEG, 65536] {
            let options = StreamOptions::default()
                .suite(suite)
                .segment_size(seg as u32);
            for n in [0, 1, seg - 1, seg, seg + 1, 2 * seg, 3 * seg + 5] {
                let pt = plain(n);
                for chunk in [1, 7, seg, 100_000] {
                    if chunk < 7 && n > 1000 {
                        continue;
                    }
                    let object = seal(&master, options, &pt, chunk);
                    assert_eq!(
                        object.len() as u64,
                        ciphertext_len(n as u64, seg as u32).unwrap(),
                        "{suite} seg {seg} n {n}"
                    );
                    let header = StreamHeader::parse(&object).unwrap();
                    assert_eq!(header.suite(), suite);
                    assert_eq!(header.segment_size(), seg as u32);
                    assert_eq!(object[3], 0x80 | suite.id());
                    for read_chunk in [1, 13, seg + 3] {
                        if read_chunk == 1 && n > 1000 {
                            continue;
                        }
                        assert_eq!(
                            open_with(&master, &ctx(), &object, read_chunk).unwrap(),
                            pt,
                            "{suite} seg {seg} n {n} chunk {chunk}/{read_chunk}"
                        );
                    }
                }
            }
        }
    }
}

/// A reader that hands out at most `max` bytes per read.
struct Trickle<'a>(&'a [u8], usize);

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.1).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn encrypt_and_decrypt_functions_round_trip_from_any_reader() {
    let master = key(1);
    for suite in Suite::ALL {
        for n in [0, 1, SEG - 1, SEG, SEG + 1, 4 * SEG, 4 * SEG + 33] {
            let pt = plain(n);
            for max in [1, 5, SEG, 10_000] {
                let mut object = Vec::new();
                let len = stream::encrypt(
                    &master,
                    small(suite),
                    &ctx(),
                    Trickle(&pt, max),
                    &mut object,
                )
                .unwrap();
                assert_eq!(len, n as u64);
                assert_eq!(
                    object.len() as u64,
                    ciphertext_len(n as u64, SEG as u32).unwrap()
                );
                let mut out = Vec::new();
                let len =
                    stream::decrypt(&master, &ctx(), Trickle(&object, max), &mut out).unwrap();
                assert_eq!((len, out), (n as u64, pt.clone()), "{suite} {n} {max}");
            }
        }
    }
}

#[test]
fn overhead_is_the_header_and_a_tag_per_segment() {
    assert_eq!(STREAM_HEADER_LEN, 111);
    assert_eq!(ciphertext_len(0, 65536), Some(127));
    assert_eq!(ciphertext_len(65535, 65536), Some(65535 + 127));
    assert_eq!(ciphertext_len(65536, 65536), Some(65536 + 111 + 32));
    assert_eq!(
        ciphertext_len(1 << 30, 65536),
        Some((1 << 30) + 111 + 16 * 16385)
    );
    assert_eq!(ciphertext_len(1, 0), None);
}

/// Segment boundaries of an object with 64-byte segments.
fn boundaries(object: &[u8]) -> Vec<usize> {
    (STREAM_HEADER_LEN..=object.len()).step_by(FULL).collect()
}

#[test]
fn every_truncation_is_rejected() {
    let master = key(1);
    for suite in Suite::ALL {
        let object = seal(&master, small(suite), &plain(4 * SEG + 10), 50);
        let ends = boundaries(&object);
        for cut in 0..object.len() {
            let err = open(&master, &object[..cut]).unwrap_err();
            if cut < STREAM_HEADER_LEN {
                assert!(
                    matches!(err, Error::Format(FormatError::TooShort { .. })),
                    "cut {cut}: {err}"
                );
            } else if ends.contains(&cut) {
                let k = ((cut - STREAM_HEADER_LEN) / FULL) as u64;
                assert!(
                    matches!(err, Error::Stream(StreamError::Truncated { segments }) if segments == k),
                    "cut {cut}: {err}"
                );
            } else {
                assert!(
                    matches!(
                        err,
                        Error::Stream(StreamError::Segment { .. } | StreamError::Truncated { .. })
                    ),
                    "cut {cut}: {err}"
                );
            }
        }
        // The same through the random-access reader.
        for cut in STREAM_HEADER_LEN..object.len() {
            let cut_obj = &object[..cut];
            let header = StreamHeader::parse(cut_obj).unwrap();
            assert!(
                SeekDecryptor::new(header, &master, &ctx(), Cursor::new(cut_obj)).is_err(),
                "seek cut {cut}"
            );
        }
    }
}

fn segments_of(object: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let header = object[..STREAM_HEADER_LEN].to_vec();
    let segs = object[STREAM_HEADER_LEN..]
        .chunks(FULL)
        .map(<[u8]>::to_vec)
        .collect();
    (header, segs)
}

fn join(header: &[u8], segs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = header.to_vec();
    for s in segs {
        out.extend_from_slice(s);
    }
    out
}

fn assert_segment_error(master: &MasterKey, object: &[u8], what: &str) {
    let err = open(master, object).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Stream(StreamError::Segment { .. } | StreamError::Truncated { .. })
        ),
        "{what}: {err}"
    );
    // And through random access, which must fail on open or on a read.
    let header = StreamHeader::parse(object).unwrap();
    if let Ok(mut seek) = SeekDecryptor::new(header, master, &ctx(), Cursor::new(object)) {
        let len = seek.plaintext_len();
        assert!(seek.read_range(0..len).is_err(), "seek {what}");
    }
}

#[test]
fn reordered_duplicated_dropped_and_appended_segments_are_rejected() {
    let master = key(1);
    for suite in Suite::ALL {
        let object = seal(&master, small(suite), &plain(5 * SEG + 9), 64);
        let (header, segs) = segments_of(&object);
        assert_eq!(segs.len(), 6);
        for i in 0..segs.len() - 1 {
            let mut s = segs.clone();
            s.swap(i, i + 1);
            assert_segment_error(&master, &join(&header, &s), &format!("swap {i}"));
            let mut s = segs.clone();
            s.insert(i, segs[i].clone());
            assert_segment_error(&master, &join(&header, &s), &format!("duplicate {i}"));
            let mut s = segs.clone();
            s.remove(i);
            assert_segment_error(&master, &join(&header, &s), &format!("drop {i}"));
        }
        // The final segment moved earlier, a full segment made final.
        let mut s = segs.clone();
        let last = s.pop().unwrap();
        s.insert(2, last);
        assert_segment_error(&master, &join(&header, &s), "final moved");
        for extra in [&[0u8][..], &[0; 15], &[0; 16], &[0; 80], &segs[1]] {
            let mut appended = object.clone();
            appended.extend_from_slice(extra);
            assert_segment_error(&master, &appended, &format!("append {}", extra.len()));
        }
        // A segment from another object with the same key and context.
        let other = seal(&master, small(suite), &plain(5 * SEG + 9), 64);
        let (_, other_segs) = segments_of(&other);
        let mut s = segs.clone();
        s[1] = other_segs[1].clone();
        assert_segment_error(&master, &join(&header, &s), "foreign segment");
    }
}

#[test]
fn every_bit_flip_is_rejected() {
    let master = key(1);
    let object = seal(&master, small(Suite::Aes256Gcm), &plain(3 * SEG + 20), 64);
    for i in 0..object.len() {
        for bit in [0x01, 0x80] {
            let mut bad = object.clone();
            bad[i] ^= bit;
            let result = open(&master, &bad);
            assert!(result.is_err(), "byte {i} bit {bit:#x}");
            if i >= STREAM_HEADER_LEN {
                let err = result.unwrap_err();
                assert!(
                    matches!(err, Error::Stream(StreamError::Segment { index }) if index == ((i - STREAM_HEADER_LEN) / FULL) as u64),
                    "byte {i}: {err}"
                );
            }
        }
    }
}

#[test]
fn wrong_context_key_or_version_is_rejected_before_any_segment() {
    let master = key(1);
    let object = seal(&master, small(Suite::ChaCha20Poly1305), &plain(300), 64);
    let other_ctx = ctx().with("object", "backup-2");
    assert!(matches!(
        open_with(&master, &other_ctx, &object, 10),
        Err(Error::Decrypt)
    ));
    assert!(matches!(
        open_with(&master, &EncryptionContext::new(), &object, 10),
        Err(Error::Decrypt)
    ));
    assert!(matches!(open(&key(1), &object), Err(Error::Decrypt)));
    assert!(matches!(
        open(&key(2), &object),
        Err(Error::VersionMismatch {
            record: 1,
            supplied: 2
        })
    ));
    // A record reader refuses a stream; a stream reader refuses a record.
    assert!(matches!(
        record::decrypt(&master, &ctx(), &object),
        Err(Error::Format(FormatError::UnknownSuite(0x82)))
    ));
    let rec = record::encrypt(&master, Suite::default(), &ctx(), b"x").unwrap();
    assert!(matches!(
        StreamHeader::parse(&rec),
        Err(Error::Format(FormatError::UnknownSuite(0x01)))
    ));
}

#[test]
fn segment_size_bounds_are_enforced() {
    let master = key(1);
    for bad in [0, 1, 63, (16 << 20) + 1, u32::MAX] {
        let err = Encryptor::new(
            &master,
            StreamOptions::default().segment_size(bad),
            &ctx(),
            Vec::new(),
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::Stream(StreamError::SegmentSize { size, .. }) if size == bad),
            "{bad}: {err}"
        );
    }
    for good in [64, 65536, 16 << 20] {
        Encryptor::new(
            &master,
            StreamOptions::default().segment_size(good),
            &ctx(),
            Vec::new(),
        )
        .unwrap();
    }
}

#[test]
fn no_plaintext_of_a_failing_segment_is_released() {
    let master = key(1);
    let pt = plain(4 * SEG + 3);
    let object = seal(&master, small(Suite::Aes256Gcm), &pt, 64);
    // Corrupt segment 2's tag: segments 0 and 1 come out, then the error.
    let mut bad = object.clone();
    bad[STREAM_HEADER_LEN + 3 * FULL - 1] ^= 1;
    let mut dec = Decryptor::open(&master, &ctx(), &bad[..]).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1000];
    let err = loop {
        match dec.read(&mut buf) {
            Ok(0) => panic!("must fail"),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(out, &pt[..2 * SEG]);
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(matches!(
        Error::from(err),
        Error::Stream(StreamError::Segment { index: 2 })
    ));
    // Later reads fail the same way; nothing more comes out.
    assert!(dec.read(&mut buf).is_err());

    // A buffer large enough for a whole segment is opened into directly:
    // on failure nothing of the segment is left in it.
    let mut bad = object.clone();
    bad[STREAM_HEADER_LEN + 5] ^= 1;
    let mut dec = Decryptor::open(&master, &ctx(), &bad[..]).unwrap();
    let mut big = [0xAAu8; 1000];
    assert!(dec.read(&mut big).is_err());
    assert!(big[..SEG].iter().all(|&b| b == 0));
    assert!(big[SEG..].iter().all(|&b| b == 0xAA));

    // A truncated stream reports UnexpectedEof, never a clean end.
    let cut = &object[..STREAM_HEADER_LEN + 2 * FULL];
    let mut dec = Decryptor::open(&master, &ctx(), cut).unwrap();
    let err = dec.read_to_end(&mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn adapters_hold_about_two_segments_whatever_the_size() {
    let master = key(1);
    let seg = 65536usize;
    let options = StreamOptions::default();
    let mut enc = Encryptor::new(&master, options, &ctx(), io::sink()).unwrap();
    let before = enc.buffered_capacity();
    let block = vec![1u8; 10_000];
    for _ in 0..300 {
        enc.write_all(&block).unwrap();
        assert_eq!(enc.buffered_capacity(), before);
    }
    assert!(before <= seg + 16 + STREAM_HEADER_LEN, "{before}");
    enc.finish().unwrap();

    let object = seal(&master, options, &plain(5 * seg + 1), 70_000);
    let mut dec = Decryptor::open(&master, &ctx(), &object[..]).unwrap();
    let before = dec.buffered_capacity();
    let mut buf = vec![0u8; 3000];
    while dec.read(&mut buf).unwrap() > 0 {
        assert_eq!(dec.buffered_capacity(), before);
    }
    assert!(before <= 2 * seg + 16 + STREAM_HEADER_LEN, "{before}");
}

/// Counts bytes and reads that reach the source.
struct Counting<R> {
    inner: R,
    bytes: u64,
    reads: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        self.reads += 1;
        Ok(n)
    }
}

impl<R: Seek> Seek for Counting<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[test]
fn range_reads_return_the_slice_and_read_only_the_segments_needed() {
    let master = key(1);
    let pt = plain(10 * SEG + 17);
    let object = seal(&master, small(Suite::Aes256Gcm), &pt, 64);
    let last_len = (object.len() - STREAM_HEADER_LEN) % FULL;

    let mut source = Counting {
        inner: Cursor::new(object.clone()),
        bytes: 0,
        reads: 0,
    };
    let header = StreamHeader::read(&mut source).unwrap();
    assert_eq!(source.bytes, STREAM_HEADER_LEN as u64);
    let mut seek = SeekDecryptor::new(header, &master, &ctx(), source).unwrap();
    assert_eq!(seek.plaintext_len(), pt.len() as u64);
    // Opening read the final segment only (it authenticates the length).
    assert_eq!(seek.segments_read(), 1);

    // A range inside segment 3 reads exactly that segment.
    let got = seek.read_range(3 * 64 + 5..3 * 64 + 60).unwrap();
    assert_eq!(got, &pt[3 * 64 + 5..3 * 64 + 60]);
    assert_eq!(seek.segments_read(), 2);
    // Spanning segments 5..=7: three segments.
    let got = seek.read_range(5 * 64 + 63..7 * 64 + 1).unwrap();
    assert_eq!(got, &pt[5 * 64 + 63..7 * 64 + 1]);
    assert_eq!(seek.segments_read(), 5);
    let source = seek.into_inner();
    assert_eq!(
        source.bytes,
        (STREAM_HEADER_LEN + last_len + 4 * FULL) as u64,
        "bytes read from the source"
    );

    // Every range of a smaller object equals the slice.
    let pt = plain(3 * SEG + 10);
    let object = seal(&master, small(Suite::ChaCha20Poly1305), &pt, 64);
    let mut cursor = Cursor::new(&object[..]);
    let header = StreamHeader::read(&mut cursor).unwrap();
    let mut seek = SeekDecryptor::new(header, &master, &ctx(), cursor).unwrap();
    for start in (0..=pt.len()).step_by(7) {
        for end in (start..=pt.len()).step_by(11) {
            assert_eq!(
                seek.read_range(start as u64..end as u64).unwrap(),
                &pt[start..end],
                "{start}..{end}"
            );
        }
    }
    let len = pt.len() as u64;
    assert!(matches!(
        seek.read_range(0..len + 1),
        Err(Error::Stream(StreamError::Range { .. }))
    ));
    // Read + Seek over the plaintext.
    seek.seek(SeekFrom::Start(100)).unwrap();
    let mut tail = Vec::new();
    seek.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, &pt[100..]);
    seek.seek(SeekFrom::End(-5)).unwrap();
    let mut five = [0u8; 5];
    seek.read_exact(&mut five).unwrap();
    assert_eq!(five, pt[pt.len() - 5..]);
    assert!(seek.seek(SeekFrom::Current(-1000)).is_err());
}

#[test]
fn header_only_rewrap_then_decrypt_under_the_new_version() {
    let v1 = key(1);
    let v2 = key(2);
    let pt = plain(7 * SEG + 1);
    let object = seal(&v1, small(Suite::Aes256Gcm), &pt, 64);

    // The rewrap job's view: only the header.
    let mut header = object[..STREAM_HEADER_LEN].to_vec();
    let info = format::inspect_header(&header).unwrap();
    assert_eq!(
        (info.kind, info.key_version, info.segment_size),
        (HeaderKind::Stream, 1, Some(SEG as u32))
    );
    // Wrong key or context: refused, header unchanged.
    let before = header.clone();
    assert!(record::rewrap_header_in_place(&mut header, &key(1), &v2, &ctx()).is_err());
    assert!(
        record::rewrap_header_in_place(&mut header, &v1, &v2, &EncryptionContext::new()).is_err()
    );
    assert_eq!(header, before);

    let info = record::rewrap_header_in_place(&mut header, &v1, &v2, &ctx()).unwrap();
    assert_eq!(info.key_version, 2);
    record::check_header(&header, &v2, &ctx()).unwrap();
    assert!(record::check_header(&header, &v1, &ctx()).is_err());
    // Only the rewrap part changed.
    assert_eq!(header[..47], object[..47]);
    assert_ne!(header[47..], object[47..STREAM_HEADER_LEN]);

    let mut rotated = header.clone();
    rotated.extend_from_slice(&object[STREAM_HEADER_LEN..]);
    // The old version is destroyed: decrypt still works with the new one.
    drop(v1);
    assert_eq!(open(&v2, &rotated).unwrap(), pt);

    // On a Read + Write + Seek object: the payload bytes are not touched.
    let v3 = key(3);
    let mut file = Cursor::new(rotated.clone());
    let header = stream::rewrap_in_place(&mut file, &v2, &v3, &ctx()).unwrap();
    assert_eq!(header.key_version(), 3);
    let file = file.into_inner();
    assert_eq!(file[STREAM_HEADER_LEN..], rotated[STREAM_HEADER_LEN..]);
    assert_eq!(open(&v3, &file).unwrap(), pt);
    assert!(matches!(
        open(&v2, &file),
        Err(Error::VersionMismatch { .. })
    ));

    // The same function rewraps a record header.
    let rec = record::encrypt(&v3, Suite::ChaCha20Poly1305, &ctx(), b"row").unwrap();
    let mut rec_header = rec[..format::HEADER_LEN].to_vec();
    let v4 = key(4);
    let info = record::rewrap_header_in_place(&mut rec_header, &v3, &v4, &ctx()).unwrap();
    assert_eq!((info.kind, info.key_version), (HeaderKind::Record, 4));
    let mut moved = rec_header;
    moved.extend_from_slice(&rec[format::HEADER_LEN..]);
    assert_eq!(record::decrypt(&v4, &ctx(), &moved).unwrap(), b"row");
    // Whole record in the buffer: same result as record::rewrap.
    let mut whole = rec.clone();
    record::rewrap_header_in_place(&mut whole, &v3, &v4, &ctx()).unwrap();
    assert_eq!(record::decrypt(&v4, &ctx(), &whole).unwrap(), b"row");
}

#[test]
fn reencrypt_streams_under_a_fresh_data_key() {
    let v1 = key(1);
    let v2 = key(2);
    let pt = plain(3 * SEG + 2);
    let object = seal(&v1, small(Suite::ChaCha20Poly1305), &pt, 64);
    let mut out = Vec::new();
    assert_eq!(
        stream::reencrypt(&v1, &v2, &ctx(), &object[..], &mut out).unwrap(),
        pt.len() as u64
    );
    let header = StreamHeader::parse(&out).unwrap();
    assert_eq!(
        (header.key_version(), header.suite(), header.segment_size()),
        (2, Suite::ChaCha20Poly1305, SEG as u32)
    );
    // A fresh data key: a different commitment.
    assert_ne!(out[4..36], object[4..36]);
    assert_eq!(open(&v2, &out).unwrap(), pt);
    // A cut source fails the re-encryption.
    let cut = &object[..object.len() - 20];
    assert!(stream::reencrypt(&v1, &v2, &ctx(), cut, &mut Vec::new()).is_err());
}

#[test]
fn io_errors_of_the_inner_writer_surface_and_can_be_retried() {
    struct Flaky {
        out: Vec<u8>,
        fail_at: usize,
        failed: bool,
    }
    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if !self.failed && self.out.len() + buf.len() > self.fail_at {
                self.failed = true;
                return Err(io::Error::other("disk full"));
            }
            // Short writes, to exercise partial output.
            let n = buf.len().min(33);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let master = key(1);
    let pt = plain(5 * SEG);
    let mut enc = Encryptor::new(
        &master,
        small(Suite::Aes256Gcm),
        &ctx(),
        Flaky {
            out: Vec::new(),
            fail_at: 200,
            failed: false,
        },
    )
    .unwrap();
    let mut rest = &pt[..];
    let mut errors = 0;
    while !rest.is_empty() {
        match enc.write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) => {
                assert_eq!(e.to_string(), "disk full");
                errors += 1;
            }
        }
    }
    assert_eq!(errors, 1);
    let object = enc.finish().unwrap().out;
    assert_eq!(open(&master, &object).unwrap(), pt);
}

#[test]
fn backends_read_each_other() {
    use keyfold_core::suite::Backend;
    let master = key(1);
    let pt = plain(3 * SEG + 7);
    for suite in Suite::ALL {
        for &sealer in Backend::all() {
            let object = seal(&master, small(suite).backend(sealer), &pt, 50);
            for &opener in Backend::all() {
                let mut dec = Decryptor::open(&master, &ctx(), &object[..])
                    .unwrap()
                    .with_backend(opener);
                let mut out = Vec::new();
                dec.read_to_end(&mut out).unwrap();
                assert_eq!(out, pt, "{suite} {sealer:?} -> {opener:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip_with_random_sizes_and_segment_sizes(
        len in 0usize..3000,
        seg in 64u32..400,
        chacha in any::<bool>(),
        wchunk in 1usize..500,
        rchunk in 1usize..500,
        range in (0usize..3000, 0usize..3000),
    ) {
        let master = key(9);
        let suite = if chacha { Suite::ChaCha20Poly1305 } else { Suite::Aes256Gcm };
        let options = StreamOptions::default().suite(suite).segment_size(seg);
        let pt = plain(len);
        let object = seal(&master, options, &pt, wchunk);
        prop_assert_eq!(object.len() as u64, ciphertext_len(len as u64, seg).unwrap());
        prop_assert_eq!(open_with(&master, &ctx(), &object, rchunk).unwrap(), pt.clone());

        let mut cursor = Cursor::new(&object[..]);
        let header = StreamHeader::read(&mut cursor).unwrap();
        let mut seek = SeekDecryptor::new(header, &master, &ctx(), cursor).unwrap();
        let (a, b) = (range.0.min(len), range.1.min(len));
        let (a, b) = (a.min(b), a.max(b));
        prop_assert_eq!(seek.read_range(a as u64..b as u64).unwrap(), &pt[a..b]);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(body in proptest::collection::vec(any::<u8>(), 0..600)) {
        let master = key(1);
        let object = seal(&master, small(Suite::Aes256Gcm), b"", 1);
        let mut forged = object[..STREAM_HEADER_LEN].to_vec();
        forged.extend_from_slice(&body);
        prop_assert!(open(&master, &forged).is_err());
        let header = StreamHeader::parse(&forged).unwrap();
        if let Ok(mut seek) = SeekDecryptor::new(header, &master, &ctx(), Cursor::new(&forged[..])) {
            let len = seek.plaintext_len();
            prop_assert!(seek.read_range(0..len).is_err());
        }
    }

    #[test]
    fn arbitrary_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let master = key(1);
        let _ = open(&master, &data);
        let _ = format::inspect_header(&data);
        let mut buf = data.clone();
        let _ = record::rewrap_header_in_place(&mut buf, &master, &key(2), &ctx());
        prop_assert_eq!(buf, data);
    }
}

/// A `BufRead` source that hands out at most `chunk` bytes per `fill_buf`,
/// fails every `interrupt_every`-th call with `Interrupted`, and counts the
/// whole sealed segments consumed in one go (the borrowing path).
struct Awkward<'a> {
    data: &'a [u8],
    chunk: usize,
    interrupt_every: usize,
    calls: usize,
    whole_segments: usize,
}

impl Awkward<'_> {
    fn interrupted(&mut self) -> bool {
        self.calls += 1;
        self.interrupt_every > 0 && self.calls.is_multiple_of(self.interrupt_every)
    }
}

impl Read for Awkward<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.interrupted() {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

impl io::BufRead for Awkward<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.interrupted() {
            return Err(io::ErrorKind::Interrupted.into());
        }
        Ok(&self.data[..self.chunk.min(self.data.len())])
    }

    fn consume(&mut self, n: usize) {
        if n == FULL {
            self.whole_segments += 1;
        }
        self.data = &self.data[n..];
    }
}

#[test]
fn buffered_decryptor_handles_any_source_buffering_and_interruptions() {
    let master = key(1);
    let pt = plain(7 * SEG + 5);
    let object = seal(&master, small(Suite::Aes256Gcm), &pt, 1000);
    let header = StreamHeader::parse(&object).unwrap();
    let body = &object[STREAM_HEADER_LEN..];
    for chunk in [1, FULL - 1, FULL, FULL + 1, 3 * FULL, body.len()] {
        for interrupt_every in [0, 2, 3] {
            let source = Awkward {
                data: body,
                chunk,
                interrupt_every,
                calls: 0,
                whole_segments: 0,
            };
            let mut dec =
                stream::BufDecryptor::new(header.clone(), &master, &ctx(), source).unwrap();
            let mut out = Vec::new();
            let mut buf = [0u8; 200];
            loop {
                match dec.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("chunk {chunk}, every {interrupt_every}: {e}"),
                }
            }
            assert_eq!(out, pt, "chunk {chunk}, every {interrupt_every}");
            let borrowed = dec.into_inner().whole_segments;
            if chunk >= FULL {
                assert_eq!(borrowed, 7, "chunk {chunk}: whole segments not borrowed");
            } else {
                assert_eq!(borrowed, 0, "chunk {chunk}");
            }
        }
    }
}

/// With a realistic segment size, a `BufReader` many segments long lends
/// most segments whole (it refills only when empty, so the ones straddling
/// its refills are copied), and every backend opens them.
#[test]
fn a_large_bufreader_lends_most_segments_whole() {
    const SEGMENT: usize = 1024;
    let master = key(1);
    let seg = SEGMENT;
    let pt = plain(50 * seg + 7);
    let options = StreamOptions::default().segment_size(seg as u32);
    let object = {
        let mut enc = Encryptor::new(&master, options, &ctx(), Vec::new()).unwrap();
        enc.write_all(&pt).unwrap();
        enc.finish().unwrap()
    };
    struct Counting<R> {
        inner: R,
        whole: usize,
    }
    impl<R: io::BufRead> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }
    impl<R: io::BufRead> io::BufRead for Counting<R> {
        fn fill_buf(&mut self) -> io::Result<&[u8]> {
            self.inner.fill_buf()
        }
        fn consume(&mut self, n: usize) {
            self.whole += usize::from(n == SEGMENT + 16);
            self.inner.consume(n);
        }
    }
    for &backend in keyfold_core::suite::Backend::all() {
        for (capacity, at_least) in [(64 * 1024, 48), (8 * 1024, 40)] {
            let source = Counting {
                inner: io::BufReader::with_capacity(capacity, &object[..]),
                whole: 0,
            };
            let mut dec = stream::BufDecryptor::open(&master, &ctx(), source)
                .unwrap()
                .with_backend(backend);
            let mut out = Vec::new();
            dec.read_to_end(&mut out).unwrap();
            assert_eq!(out, pt);
            let whole = dec.into_inner().whole;
            assert!(
                (at_least..=50).contains(&whole),
                "{backend:?}, capacity {capacity}: {whole} of 50 lent whole"
            );
        }
    }
}
