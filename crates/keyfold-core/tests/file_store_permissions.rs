//! FileStore and the file system it trusts (docs/THREAT_MODEL.md, "Tenant
//! and operator settings"): an existing directory that group or others can
//! write is refused with a typed error, and a link planted where a save
//! writes its temporary file is never followed.
#![cfg(unix)]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use keyfold_core::keyring::StoredKeyring;
use keyfold_core::store::{FileStore, KeyringStore, StoreError};
use keyfold_core::time::Timestamp;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyfold-fsperm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_directory_others_can_write_is_refused() {
    let root = scratch("dirs");
    for mode in [0o777, 0o770, 0o722, 0o1777, 0o702] {
        let dir = root.join(format!("m{mode:o}"));
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, mode);
        let err = FileStore::new(&dir).unwrap_err();
        assert!(
            matches!(&err, StoreError::InsecureDirectory { mode: m, .. } if *m == mode),
            "{mode:o}: {err}"
        );
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }
    for mode in [0o700, 0o750, 0o755] {
        let dir = root.join(format!("ok{mode:o}"));
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, mode);
        FileStore::new(&dir).unwrap();
    }
    // A directory the store makes itself is owner-only.
    let made = root.join("made");
    FileStore::new(&made).unwrap();
    assert_eq!(
        std::fs::metadata(&made).unwrap().permissions().mode() & 0o777,
        0o700
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn a_link_planted_at_the_temporary_file_is_not_followed() {
    let root = scratch("link");
    let dir = root.join("store");
    let store = FileStore::new(&dir).unwrap();
    let victim = root.join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("acme.json.tmp")).unwrap();
    let keyring = StoredKeyring::new("acme", Timestamp(1_700_000_000));
    store.save("acme", None, &keyring).await.unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    assert!(store.load("acme").await.unwrap().is_some());
    let meta = std::fs::symlink_metadata(store.path_of("acme")).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    std::fs::remove_dir_all(&root).unwrap();
}
