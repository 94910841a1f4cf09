//! The shared `KeyWrapper` conformance suite, run against the fake Key Vault
//! (RSA-OAEP-256) and the fake Managed HSM (A256KW).

mod support;

use keyfold_core::testkit::{self, Capabilities};
use support::FakeVault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_rsa_oaep_256() {
    let vault = FakeVault::start().await;
    vault.create_rsa_key("tenant-a");
    vault.create_rsa_key("tenant-b");
    let a = support::wrapper(&vault, "tenant-a");
    let b = support::wrapper(&vault, "tenant-b");
    // Key Vault takes no AAD: the binding to keyring and version is carried
    // by keyfold's authenticated record header, not by the KMS.
    testkit::run_all(
        &a,
        &b,
        Capabilities {
            binds_context: false,
            ..Capabilities::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_managed_hsm_a256kw() {
    let hsm = FakeVault::start_hsm().await;
    hsm.create_aes_key("tenant-a");
    hsm.create_aes_key("tenant-b");
    let a = support::wrapper(&hsm, "tenant-a");
    let b = support::wrapper(&hsm, "tenant-b");
    // AES key wrap (RFC 3394) is deterministic: no randomized wraps.
    testkit::run_all(
        &a,
        &b,
        Capabilities {
            binds_context: false,
            randomized: false,
            ..Capabilities::default()
        },
    )
    .await;
    assert_eq!(
        a.algorithm().await.unwrap(),
        keyfold_azure::WrapAlgorithm::A256Kw
    );
}
