//! The AWS SDK stays out of keyfold-core's dependency tree (all features).
//! (`aws-lc-rs`, the crypto library, may be there: it is not the SDK.)
#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use std::path::Path;
use std::process::Command;

#[test]
fn keyfold_core_does_not_depend_on_the_aws_sdk() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tree = |offline: bool| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(&workspace).args([
            "tree",
            "-p",
            "keyfold-core",
            "--all-features",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ]);
        if offline {
            cmd.arg("--offline");
        }
        cmd.output().unwrap()
    };
    // Offline first (everything needed was fetched to build this test); a
    // registry lookup only if some optional dependency of core was never fetched.
    let out = match tree(true) {
        out if out.status.success() => out,
        _ => tree(false),
    };
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(tree.starts_with("keyfold-core "), "{tree}");
    let sdk: Vec<&str> = tree
        .lines()
        .filter(|l| {
            [
                "aws-sdk-",
                "aws-config ",
                "aws-smithy-",
                "aws-runtime ",
                "aws-types ",
                "aws-credential-types ",
                "hyper ",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .collect();
    assert!(sdk.is_empty(), "keyfold-core pulls in {sdk:?}");
}
