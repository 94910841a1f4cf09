//! The Azure SDK stays out of keyfold-core's dependency tree (all features),
//! and keyfold-azure's own tree uses rustls, not OpenSSL or native-tls.

use std::path::Path;
use std::process::Command;

fn tree(package: &str, features: &str) -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(env!("CARGO"))
        .current_dir(&workspace)
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            features,
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn matching<'a>(tree: &'a str, prefixes: &[&str]) -> Vec<&'a str> {
    tree.lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .collect()
}

#[test]
fn keyfold_core_does_not_depend_on_the_azure_sdk() {
    let core = tree("keyfold-core", "--all-features");
    assert!(core.starts_with("keyfold-core "), "{core}");
    let sdk = matching(
        &core,
        &["azure_", "typespec", "reqwest ", "hyper ", "rustls "],
    );
    assert!(sdk.is_empty(), "keyfold-core pulls in {sdk:?}");
}

#[test]
fn keyfold_azure_uses_rustls_not_openssl() {
    let azure = tree("keyfold-azure", "--features=");
    assert!(azure.starts_with("keyfold-azure "), "{azure}");
    for wanted in [
        "azure_security_keyvault_keys v1.0.0",
        "azure_core v1.1.0",
        "azure_identity v1.0.0",
        "rustls ",
    ] {
        assert!(
            azure.lines().any(|l| l.starts_with(wanted)),
            "{wanted} missing"
        );
    }
    // (`openssl-probe` is pure Rust: it only locates the system's CA files.)
    let native = matching(
        &azure,
        &["openssl ", "openssl-sys ", "native-tls ", "hyper-tls "],
    );
    assert!(native.is_empty(), "keyfold-azure pulls in {native:?}");
}
