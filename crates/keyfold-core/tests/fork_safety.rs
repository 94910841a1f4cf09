//! A forked child must never repeat its parent's random bytes: the same
//! generator state in two processes would give two records the same data
//! key and wrap nonce. Own process, no test harness (so no other threads
//! when forking).

#[cfg(unix)]
fn main() {
    use std::io::{Read, Write};

    use fork::Fork;
    use keyfold_core::{EncryptionContext, MasterKey, SecretKey, record, rng, suite::Suite};

    /// What one process draws after the fork: raw generator output, then a
    /// record's wrap nonce (header bytes 40..52, docs/FORMAT.md).
    fn draw(master: &MasterKey) -> Vec<u8> {
        let mut bytes = vec![0u8; 64];
        rng::fill(&mut bytes).expect("generator");
        let ct = record::encrypt(master, Suite::Aes256Gcm, &EncryptionContext::new(), b"row")
            .expect("encrypt");
        bytes.extend_from_slice(&ct[40..52]);
        bytes
    }

    let master = MasterKey::new(1, SecretKey::from_bytes(&mut [7u8; 32]));
    // Leave unread output in this thread's buffer, as a busy service would.
    rng::fill(&mut [0u8; 16]).expect("generator");

    let mut children = Vec::new();
    for _ in 0..2 {
        let (mut reader, mut writer) = std::io::pipe().expect("pipe");
        match fork::fork().expect("fork") {
            Fork::Child => {
                drop(reader);
                let code = match writer.write_all(&draw(&master)) {
                    Ok(()) => 0,
                    Err(_) => 1,
                };
                std::process::exit(code);
            }
            Fork::Parent(pid) => {
                drop(writer);
                let mut theirs = Vec::new();
                reader.read_to_end(&mut theirs).expect("read child");
                let status = fork::waitpid(pid).expect("waitpid");
                assert_eq!(status, 0, "child failed");
                children.push(theirs);
            }
        }
    }
    let mine = draw(&master);
    for theirs in &children {
        assert_eq!(theirs.len(), mine.len(), "child sent a short answer");
        assert_ne!(
            &mine[..64],
            &theirs[..64],
            "child repeated the parent's bytes"
        );
        assert_ne!(&mine[64..], &theirs[64..], "child repeated a wrap nonce");
    }
    assert_ne!(children[0], children[1], "two children drew the same bytes");
    println!("fork_safety: 2 children, no shared output: ok");
}

#[cfg(not(unix))]
fn main() {}
