//! `keyfold inspect`: what a record's or a stream's header says, without any
//! key (docs/FORMAT.md, "Record layout" and "Streaming").
//!
//! The header is parsed by keyfold-core's own parser
//! ([`format::inspect_header`]); sizes and the segment count follow from the
//! input's length, which is read to the end but never held in memory.

use std::io::Read;

use keyfold_core::format::{self, HeaderInfo, HeaderKind};
use keyfold_core::stream::{MAX_SEGMENTS, SEGMENT_OVERHEAD};
use keyfold_core::suite::TAG_LEN;
use serde_json::json;

use crate::error::{CliError, Kind};
use crate::ui::Output;

/// What `inspect` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Inspection {
    pub(crate) header: HeaderInfo,
    /// Bytes in the whole input.
    pub(crate) total_len: u64,
    /// Plaintext bytes (records: the payload; streams: all segments');
    /// `None` for a header alone.
    pub(crate) plaintext_len: Option<u64>,
    /// Streams only.
    pub(crate) segments: Option<u64>,
}

fn not_ciphertext(source: &str, why: impl std::fmt::Display) -> CliError {
    CliError::new(
        Kind::NotCiphertext,
        format!("{source} is not a keyfold ciphertext: {why}"),
    )
}

/// Reads the header and the length of `input`.
pub(crate) fn inspect_reader(source: &str, input: &mut dyn Read) -> Result<Inspection, CliError> {
    let mut head = Vec::with_capacity(format::STREAM_HEADER_LEN);
    input
        .take(format::STREAM_HEADER_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| CliError::failure(format!("reading {source}: {e}")))?;
    if head.is_empty() {
        return Err(not_ciphertext(source, "it is empty"));
    }
    let header = format::inspect_header(&head).map_err(|e| not_ciphertext(source, e))?;
    let rest = std::io::copy(input, &mut std::io::sink())
        .map_err(|e| CliError::failure(format!("reading {source}: {e}")))?;
    let total_len = head.len() as u64 + rest;
    let body = total_len - header.header_len as u64;
    if body == 0 {
        // Exactly a header: what a host stores when the payload lives
        // elsewhere (a rewrap job's header-only rows).
        return Ok(Inspection {
            header,
            total_len,
            plaintext_len: None,
            segments: None,
        });
    }
    let (plaintext_len, segments) = match header.kind {
        HeaderKind::Stream => {
            let segment = u64::from(header.segment_size.unwrap_or(format::DEFAULT_SEGMENT_SIZE));
            let whole = segment + SEGMENT_OVERHEAD as u64;
            let (full, last) = (body / whole, body % whole);
            if last < SEGMENT_OVERHEAD as u64 {
                return Err(not_ciphertext(
                    source,
                    format!(
                        "the stream is truncated: {last} bytes after its last whole segment, \
                         fewer than a segment's {SEGMENT_OVERHEAD}-byte tag"
                    ),
                ));
            }
            let segments = full + 1;
            if segments > MAX_SEGMENTS {
                return Err(not_ciphertext(
                    source,
                    format!("{segments} segments, more than a stream may have"),
                ));
            }
            (
                full * segment + last - SEGMENT_OVERHEAD as u64,
                Some(segments),
            )
        }
        _ => {
            if body < TAG_LEN as u64 {
                return Err(not_ciphertext(
                    source,
                    format!(
                        "the record is truncated: {body} bytes after its header, fewer than \
                         the {TAG_LEN}-byte payload tag"
                    ),
                ));
            }
            let plaintext = body - TAG_LEN as u64;
            if plaintext > format::MAX_RECORD_PLAINTEXT {
                return Err(not_ciphertext(
                    source,
                    "longer than a record may be (larger objects are streams)",
                ));
            }
            (plaintext, None)
        }
    };
    Ok(Inspection {
        header,
        total_len,
        plaintext_len: Some(plaintext_len),
        segments,
    })
}

/// `keyfold inspect FILE|-`.
pub(crate) fn run(file: &str, output: Output) -> Result<(), CliError> {
    let found = if file == "-" {
        inspect_reader("stdin", &mut std::io::stdin().lock())?
    } else {
        let mut f = std::fs::File::open(file).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                Kind::NotFound
            } else {
                Kind::Failure
            };
            CliError::new(kind, format!("cannot open {file}: {e}"))
        })?;
        inspect_reader(file, &mut f)?
    };
    let h = &found.header;
    let (kind, format_name) = match h.kind {
        HeaderKind::Stream => ("stream", "keyfold stream v1"),
        _ => ("record", "keyfold record v1"),
    };
    let mut text = format!(
        "format:             {format_name}\n\
         suite:              {} (id {:#04x})\n\
         master key version: {}\n\
         header:             {} bytes\n\
         payload:            {}\n",
        h.suite,
        if h.kind == HeaderKind::Stream {
            format::stream_suite_id(h.suite)
        } else {
            h.suite.id()
        },
        h.key_version,
        h.header_len,
        match found.plaintext_len {
            Some(n) => format!("{n} bytes of plaintext ({} bytes in all)", found.total_len),
            None => "none here: a header alone (its payload is stored elsewhere)".to_owned(),
        },
    );
    if let (Some(segments), Some(size)) = (found.segments, h.segment_size) {
        text.push_str(&format!(
            "segments:           {segments} of up to {size} bytes\n"
        ));
    }
    output.emit(
        &text,
        &json!({
            "kind": kind,
            "format_version": format::FORMAT_V1,
            "suite": h.suite,
            "suite_name": h.suite.to_string(),
            "key_version": h.key_version,
            "header_len": h.header_len,
            "plaintext_len": found.plaintext_len,
            "total_len": found.total_len,
            "segment_size": h.segment_size,
            "segments": found.segments,
            "header_only": found.plaintext_len.is_none(),
        }),
    );
    Ok(())
}
