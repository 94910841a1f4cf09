//! `keyfold` with default features pulls in no cloud SDK and no HTTP stack;
//! each provider feature pulls in its own SDK only.
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use std::path::Path;
use std::process::Command;

/// Crate-name prefixes of the cloud SDKs and HTTP stacks.
const CLOUD: &[&str] = &[
    "aws-sdk-",
    "aws-config ",
    "aws-smithy-",
    "aws-runtime ",
    "aws-types ",
    "aws-credential-types ",
    "gcloud-sdk ",
    "tonic ",
    "azure_",
    "typespec",
    "hyper ",
    "reqwest ",
];

/// `cargo tree -p keyfold -e normal` with `features` (and no default
/// features when `no_default`), one crate per line.
fn tree(features: &str, no_default: bool) -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let run = |offline: bool| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(&workspace).args([
            "tree", "-p", "keyfold", "-e", "normal", "--prefix", "none", "--format", "{p}",
        ]);
        if !features.is_empty() {
            cmd.args(["--features", features]);
        }
        if no_default {
            cmd.arg("--no-default-features");
        }
        if offline {
            cmd.arg("--offline");
        }
        cmd.output().unwrap()
    };
    // Offline first; a registry lookup only if an optional dependency was
    // never fetched on this machine.
    let out = match run(true) {
        out if out.status.success() => out,
        _ => run(false),
    };
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(tree.starts_with("keyfold "), "{tree}");
    tree
}

fn cloud_crates(tree: &str) -> Vec<&str> {
    tree.lines()
        .filter(|l| CLOUD.iter().any(|p| l.starts_with(p)))
        .collect()
}

#[test]
fn default_features_pull_in_no_cloud_sdk() {
    let tree = tree("", false);
    let found = cloud_crates(&tree);
    assert!(found.is_empty(), "keyfold (default) pulls in {found:?}");
    assert!(tree.lines().any(|l| l.starts_with("keyfold-core ")));
    assert!(tree.lines().any(|l| l.starts_with("aws-lc-rs ")), "{tree}");
}

#[test]
fn rewrap_and_stream_pull_in_no_cloud_sdk() {
    let tree = tree("rewrap,stream", false);
    let found = cloud_crates(&tree);
    assert!(
        found.is_empty(),
        "keyfold (rewrap, stream) pulls in {found:?}"
    );
    assert!(tree.lines().any(|l| l.starts_with("keyfold-rewrap ")));
}

#[test]
fn without_default_features_the_aws_lc_backend_is_gone() {
    let tree = tree("", true);
    assert!(cloud_crates(&tree).is_empty(), "{tree}");
    assert!(
        !tree.lines().any(|l| l.starts_with("aws-lc-rs ")),
        "aws-lc-rs without the aws-lc feature: {tree}"
    );
}

#[test]
fn the_aws_feature_pulls_in_the_aws_sdk_only() {
    let tree = tree("aws", false);
    assert!(
        tree.lines().any(|l| l.starts_with("aws-sdk-kms ")),
        "{tree}"
    );
    assert!(!tree.lines().any(|l| l.starts_with("gcloud-sdk ")));
    assert!(!tree.lines().any(|l| l.starts_with("azure_")));
}
