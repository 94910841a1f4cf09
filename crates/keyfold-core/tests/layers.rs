//! keyfold-core's layering (issue #15, README "Crates"): the format knows
//! nothing of wrapping or the keyring, wrapping knows nothing of the
//! keyring, no layer reaches into the crate-root re-export modules, and the
//! keyring's leaf modules import each other without a circle. Read from the
//! sources, so a stray `use` fails here rather than in review.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Code lines (comments and doc comments dropped: docs may link upwards).
fn code(path: &Path) -> String {
    fs::read_to_string(path)
        .expect("read source")
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The root's compatibility modules (`keyfold_core::record`, ...) and the
/// crate-level error: for callers only.
const ROOT_ALIASES: &[&str] = &[
    "crate::context",
    "crate::record",
    "crate::rng",
    "crate::secret",
    "crate::stream",
    "crate::suite",
    "crate::audit",
    "crate::policy",
    "crate::store",
    "crate::time",
    "crate::config",
    "crate::local",
    "crate::probe",
    "crate::retry",
    "crate::error",
    "crate::Error",
    "crate::testkit",
];

fn offenders(layer: &str, forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for file in sources(&src().join(layer)) {
        let text = code(&file);
        for needle in forbidden.iter().chain(ROOT_ALIASES) {
            // `crate::error` must not match `crate::format::error`: the
            // needle is always a full path from the crate root.
            for (at, _) in text.match_indices(needle) {
                let next = text[at + needle.len()..].chars().next();
                if next.is_none_or(|c| !(c.is_alphanumeric() || c == '_')) {
                    found.push(format!("{} uses {needle}", file.display()));
                }
            }
        }
    }
    found
}

#[test]
fn the_format_imports_neither_wrapping_nor_the_keyring() {
    let found = offenders(
        "format",
        &["crate::wrap", "crate::keyring", "crate::KeyWrapper"],
    );
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn wrapping_does_not_import_the_keyring() {
    let found = offenders("wrap", &["crate::keyring", "crate::Keyring"]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_keyring_uses_layered_paths() {
    let found = offenders("keyring", &[]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn keyring_leaf_modules_have_no_import_circle() {
    // The handle's files (mod.rs and the files that `use super::*` to extend
    // `impl Keyring`) sit on top; the leaves below them must form a DAG.
    let dir = src().join("keyring");
    let mut leaves = BTreeMap::new();
    for file in sources(&dir) {
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let text = code(&file);
        if name == "mod" || text.contains("use super::*;\n\n") && !text.contains("mod tests") {
            continue;
        }
        leaves.insert(name, text);
    }
    assert!(
        leaves.contains_key("state") && leaves.contains_key("error"),
        "{:?}",
        leaves.keys()
    );
    let names: BTreeSet<String> = leaves.keys().cloned().collect();
    let edges: BTreeMap<String, BTreeSet<String>> = leaves
        .iter()
        .map(|(name, text)| {
            let deps = names
                .iter()
                .filter(|other| *other != name)
                .filter(|other| {
                    text.contains(&format!("super::{other}::"))
                        || text.contains(&format!("crate::keyring::{other}::"))
                })
                .cloned()
                .collect();
            (name.clone(), deps)
        })
        .collect();
    // Kahn's algorithm: whatever cannot be ordered is on a circle.
    let mut indegree: BTreeMap<&String, usize> = names.iter().map(|n| (n, 0)).collect();
    for deps in edges.values() {
        for d in deps {
            *indegree.get_mut(d).expect("known") += 1;
        }
    }
    let mut ready: Vec<&String> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(n, _)| *n)
        .collect();
    let mut ordered = 0;
    while let Some(n) = ready.pop() {
        ordered += 1;
        for d in &edges[n] {
            let e = indegree.get_mut(d).expect("known");
            *e -= 1;
            if *e == 0 {
                ready.push(d);
            }
        }
    }
    assert_eq!(
        ordered,
        names.len(),
        "import circle among keyring modules: {edges:#?}"
    );
}
