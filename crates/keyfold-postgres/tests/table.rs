//! `PgTable` against a real PostgreSQL server: context columns and NULLs,
//! id orders, the batch compare-and-swap, concurrent application writes,
//! configuration errors, shard ranges.

mod rewrap;
mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use keyfold_core::{Suite, format, record};
use keyfold_postgres::{IdRange, OnNull, PgTable, TableError};
use keyfold_rewrap::{
    CasOutcome, CasWrite, JobError, JobOptions, RewrapJob, Row, RowSource, SourceError,
};
use rewrap::*;
use sqlx::PgPool;
use support::TestDb;

async fn run_to_end(job: &mut RewrapJob) -> keyfold_rewrap::Counters {
    while let Some(report) = job.next_batch().await.unwrap() {
        assert!(report.failures.is_empty(), "{:?}", report.failures);
    }
    job.checkpoint().totals()
}

fn options(batch_size: usize) -> JobOptions {
    JobOptions {
        batch_size,
        ..JobOptions::default()
    }
}

async fn ids_in(table: &PgTable, page: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let rows = table.fetch(after.as_deref(), page).await.unwrap();
        let n = rows.len();
        out.extend(rows.iter().map(|r| r.id.clone()));
        after = rows.last().map(|r| r.cursor.clone());
        if n < page {
            return out;
        }
    }
}

#[tokio::test]
async fn composite_context_columns_with_nulls_rewrap_every_row() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, _clock) = keyring().await;
    let ids: Vec<i64> = (1..=300).collect();
    bigint_accounts(&pool, &ring, "accounts", &ids).await;
    // A column whose NULL stands for a fixed value, beside one whose NULL
    // leaves the key out: rows where `kind` is NULL were encrypted with
    // kind = "none".
    sqlx::raw_sql("ALTER TABLE accounts ADD COLUMN kind text")
        .execute(&pool)
        .await
        .unwrap();
    for i in [7i64, 8] {
        let id = i.to_string();
        let mut ctx = account_context("accounts", &id, &tenant_of(i), region_of(i).as_deref());
        let kind = if i == 7 { "gold" } else { "none" };
        ctx.insert("kind", kind);
        let ct = ring
            .encrypt(&ctx, plaintext("accounts", &id).as_bytes())
            .await
            .unwrap();
        sqlx::query("UPDATE accounts SET kind = $2, secret = $3 WHERE id = $1")
            .bind(i)
            .bind((i == 7).then_some("gold"))
            .bind(ct)
            .execute(&pool)
            .await
            .unwrap();
    }
    let table = PgTable::builder("accounts")
        .id_column("id")
        .ciphertext_column("secret")
        .context_column("id", "row")
        .context_column("tenant", "tenant")
        .context_column_with("region", "region", OnNull::Omit)
        .context_column_with("kind", "kind", OnNull::Value(b"none".to_vec()))
        .context_constant("table", "accounts")
        .build(&pool)
        .await
        .unwrap();
    // Rows other than 7 and 8 have no kind in their context: give them a
    // table without the column for the job, and check 7 and 8 here.
    let row7 = table.get("7").await.unwrap().unwrap();
    assert_eq!(row7.context.get("kind"), Some(&b"gold"[..]));
    let row8 = table.get("8").await.unwrap().unwrap();
    assert_eq!(row8.context.get("kind"), Some(&b"none"[..]));
    let row9 = table.get("9").await.unwrap().unwrap();
    assert_eq!(
        row9.context.get("region"),
        None,
        "9 % 3 == 0: region is NULL"
    );
    assert_eq!(row9.context.get("tenant"), Some(&b"t1"[..]));
    assert_eq!(row9.context.get("row"), Some(&b"9"[..]));
    assert_eq!(row9.context.get("table"), Some(&b"accounts"[..]));

    ring.rotate(&admin()).await.unwrap();
    let seven_eight = table.with_range(IdRange {
        start: Some("7".into()),
        end: Some("9".into()),
    });
    let mut job = RewrapJob::builder(ring.clone(), vec![Arc::new(seven_eight.clone()) as _])
        .options(options(64))
        .create()
        .unwrap();
    let totals = run_to_end(&mut job).await;
    assert_eq!((totals.seen, totals.rewrapped, totals.failed), (2, 2, 0));

    let rest = accounts_source(&pool, "accounts").await;
    let mut job = RewrapJob::builder(ring.clone(), vec![Arc::new(rest.clone()) as _])
        .options(options(64))
        .create()
        .unwrap();
    let totals = run_to_end(&mut job).await;
    // 7 and 8 are already on v2 (skipped, never decrypted with this context).
    assert_eq!(
        (totals.seen, totals.rewrapped, totals.skipped),
        (300, 298, 2)
    );
    assert_eq!(totals.failed, 0);
    assert_eq!(rest.rows_read(), 300, "each row read once");
    assert_eq!(versions(&pool, "accounts").await, [(2, 300)].into());
    // 7 and 8 carry `kind` in their context: decrypt them with it.
    for (i, kind) in [(7i64, "gold"), (8, "none")] {
        let id = i.to_string();
        let mut ctx = account_context("accounts", &id, &tenant_of(i), region_of(i).as_deref());
        ctx.insert("kind", kind);
        let (ct,): (Vec<u8>,) = sqlx::query_as("SELECT secret FROM accounts WHERE id = $1")
            .bind(i)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(
            ring.decrypt(&ctx, &ct).await.unwrap(),
            plaintext("accounts", &id).as_bytes()
        );
    }
    let mut checked = 0;
    for (id, tenant, region, ct) in rows(&pool, "accounts").await {
        if id == "7" || id == "8" {
            continue;
        }
        let ctx = account_context("accounts", &id, &tenant, region.as_deref());
        assert_eq!(
            ring.decrypt(&ctx, &ct).await.unwrap(),
            plaintext("accounts", &id).as_bytes()
        );
        checked += 1;
    }
    assert_eq!(checked, 298);
}

#[tokio::test]
async fn a_bytea_context_column_is_its_bytes_and_a_text_one_its_utf8() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, _clock) = keyring().await;
    sqlx::raw_sql(
        "CREATE TABLE salted (id bigint PRIMARY KEY, salt bytea, label text, secret bytea)",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Bytes that are not UTF-8 in the bytea column, a non-ASCII label, and
    // a NULL salt (left out of the context) on every fifth row.
    let salt = |i: i64| (i % 5 != 0).then(|| vec![0xff, 0x00, (i % 251) as u8, 0xc3]);
    let label = |i: i64| format!("étiquette-{i}");
    let context = |i: i64| {
        let mut ctx = keyfold_core::EncryptionContext::new()
            .with("row", i.to_string())
            .with("label", label(i));
        if let Some(s) = salt(i) {
            ctx.insert("salt", s);
        }
        ctx
    };
    for i in 1..=120i64 {
        let ct = ring
            .encrypt(&context(i), plaintext("salted", &i.to_string()).as_bytes())
            .await
            .unwrap();
        sqlx::query("INSERT INTO salted (id, salt, label, secret) VALUES ($1, $2, $3, $4)")
            .bind(i)
            .bind(salt(i))
            .bind(label(i))
            .bind(ct)
            .execute(&pool)
            .await
            .unwrap();
    }
    let table = PgTable::builder("salted")
        .id_column("id")
        .ciphertext_column("secret")
        .context_column("id", "row")
        .context_column_with("salt", "salt", OnNull::Omit)
        .context_column("label", "label")
        .build(&pool)
        .await
        .unwrap();
    let row = table.get("7").await.unwrap().unwrap();
    assert_eq!(row.context, context(7));
    assert_eq!(row.context.get("salt"), Some(&[0xff, 0x00, 7, 0xc3][..]));
    assert_eq!(row.context.get("label"), Some("étiquette-7".as_bytes()));
    assert_eq!(table.get("10").await.unwrap().unwrap().context, context(10));

    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(ring.clone(), vec![Arc::new(table.clone()) as _])
        .options(options(50))
        .create()
        .unwrap();
    let totals = run_to_end(&mut job).await;
    assert_eq!(
        (totals.seen, totals.rewrapped, totals.failed),
        (120, 120, 0)
    );
    for i in [1i64, 5, 64, 120] {
        let (ct,): (Vec<u8>,) = sqlx::query_as("SELECT secret FROM salted WHERE id = $1")
            .bind(i)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(format::inspect(&ct).unwrap().key_version, 2);
        assert_eq!(
            ring.decrypt(&context(i), &ct).await.unwrap(),
            plaintext("salted", &i.to_string()).as_bytes()
        );
    }
}

#[tokio::test]
async fn a_null_the_configuration_refuses_stops_the_job_with_nothing_written() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, _clock) = keyring().await;
    bigint_accounts(&pool, &ring, "accounts", &(1..=20).collect::<Vec<_>>()).await;
    ring.rotate(&admin()).await.unwrap();
    let table = PgTable::builder("accounts")
        .id_column("id")
        .ciphertext_column("secret")
        .context_column("tenant", "tenant")
        .context_column("region", "region") // NULL refused; row 3's is NULL
        .build(&pool)
        .await
        .unwrap();
    let err = table.fetch(None, 10).await.unwrap_err();
    assert!(!err.transient);
    assert!(
        err.message.contains("row 3") && err.message.contains("\"region\""),
        "{}",
        err.message
    );
    let mut job = RewrapJob::builder(ring.clone(), vec![Arc::new(table) as _])
        .create()
        .unwrap();
    match job.next_batch().await {
        Err(JobError::Source { error, .. }) => assert!(error.message.contains("NULL")),
        other => panic!("expected a source error, got {other:?}"),
    }
    assert_eq!(versions(&pool, "accounts").await, [(1, 20)].into());
}

#[tokio::test]
async fn bigint_ids_page_in_numeric_order_and_text_ids_in_the_columns_collation() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, _clock) = keyring().await;
    let ids = [100, 9, 10, -5, 11, 1, 2, i64::MAX, i64::MIN, 0];
    bigint_accounts(&pool, &ring, "nums", &ids).await;
    let nums = accounts_source(&pool, "nums").await;
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let expected: Vec<String> = sorted.iter().map(i64::to_string).collect();
    for page in [1, 3, 4, 100] {
        assert_eq!(ids_in(&nums, page).await, expected, "page {page}");
    }

    let text_ids: Vec<String> = [
        "b", "a10", "a9", "A", "_", "z", "ä", "a", "a 1", "0", "9", "10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    text_accounts(&pool, &ring, "words", &text_ids).await;
    let words = accounts_source(&pool, "words").await;
    let mut bytewise = text_ids.clone();
    bytewise.sort(); // COLLATE "C": byte order
    for page in [1, 2, 5, 100] {
        assert_eq!(ids_in(&words, page).await, bytewise, "page {page}");
    }

    ring.rotate(&admin()).await.unwrap();
    let mut job = RewrapJob::builder(
        ring.clone(),
        vec![Arc::new(nums) as _, Arc::new(words) as _],
    )
    .options(options(3))
    .create()
    .unwrap();
    let totals = run_to_end(&mut job).await;
    assert_eq!((totals.rewrapped, totals.failed), (22, 0));
    assert_eq!(versions(&pool, "nums").await, [(2, 10)].into());
    assert_eq!(versions(&pool, "words").await, [(2, 12)].into());
    assert_decrypt(&pool, &ring, "nums", |id| plaintext("nums", id)).await;
    assert_decrypt(&pool, &ring, "words", |id| plaintext("words", id)).await;
}

#[tokio::test]
async fn the_batch_compare_and_swap_decides_each_row_on_its_own() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, _clock) = keyring().await;
    bigint_accounts(&pool, &ring, "accounts", &[1, 2, 3]).await;
    let table = accounts_source(&pool, "accounts").await;
    let old: HashMap<String, Vec<u8>> = rows(&pool, "accounts")
        .await
        .into_iter()
        .map(|(id, _, _, ct)| (id, ct))
        .collect();
    let stale: &[u8] = b"not what the row holds";
    let o1 = old["1"].clone();
    let o3 = old["3"].clone();
    let writes = [
        CasWrite {
            id: "1",
            expected: &o1,
            new: b"n1",
        },
        CasWrite {
            id: "2",
            expected: stale,
            new: b"n2",
        },
        CasWrite {
            id: "3",
            expected: &o3,
            new: b"n3",
        },
        CasWrite {
            id: "999",
            expected: stale,
            new: b"n4",
        },
    ];
    assert_eq!(
        table.compare_and_swap_many(&writes).await.unwrap(),
        vec![
            CasOutcome::Swapped,
            CasOutcome::Conflict,
            CasOutcome::Swapped,
            CasOutcome::Conflict
        ]
    );
    let now: HashMap<String, Vec<u8>> = rows(&pool, "accounts")
        .await
        .into_iter()
        .map(|(id, _, _, ct)| (id, ct))
        .collect();
    assert_eq!(now["1"], b"n1");
    assert_eq!(now["2"], old["2"]);
    assert_eq!(now["3"], b"n3");

    // The same id twice: written in order, the second sees the first.
    let writes = [
        CasWrite {
            id: "1",
            expected: b"n1",
            new: b"m1",
        },
        CasWrite {
            id: "1",
            expected: b"n1",
            new: b"m2",
        },
    ];
    assert_eq!(
        table.compare_and_swap_many(&writes).await.unwrap(),
        vec![CasOutcome::Swapped, CasOutcome::Conflict]
    );
    assert!(table.compare_and_swap_many(&[]).await.unwrap().is_empty());
    // An id that is no bigint: a permanent error, nothing written.
    let err = table
        .compare_and_swap_many(&[CasWrite {
            id: "x'; DROP TABLE accounts; --",
            expected: b"m1",
            new: b"z",
        }])
        .await
        .unwrap_err();
    assert!(!err.transient, "{}", err.message);
    assert_eq!(rows(&pool, "accounts").await.len(), 3);
    assert_eq!(
        table.compare_and_swap("1", b"m1", b"z").await.unwrap(),
        CasOutcome::Swapped
    );
    assert_eq!(
        table.compare_and_swap("1", b"m1", b"y").await.unwrap(),
        CasOutcome::Conflict
    );
}

/// Before the n-th batch write, an application instance updates two rows
/// of the batch with real SQL: one with a stale instance's v1 record, one
/// with a v2 record.
struct Meddling {
    table: PgTable,
    pool: PgPool,
    ring: Arc<keyfold_core::keyring::Keyring>,
    calls: AtomicU64,
    meddle_on: u64,
}

#[async_trait]
impl RowSource for Meddling {
    fn name(&self) -> &str {
        self.table.name()
    }
    async fn fetch(&self, after: Option<&str>, limit: usize) -> Result<Vec<Row>, SourceError> {
        self.table.fetch(after, limit).await
    }
    async fn get(&self, id: &str) -> Result<Option<Row>, SourceError> {
        self.table.get(id).await
    }
    async fn compare_and_swap(
        &self,
        id: &str,
        e: &[u8],
        n: &[u8],
    ) -> Result<CasOutcome, SourceError> {
        self.table.compare_and_swap(id, e, n).await
    }
    async fn compare_and_swap_many(
        &self,
        writes: &[CasWrite<'_>],
    ) -> Result<Vec<CasOutcome>, SourceError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.meddle_on {
            for (w, version) in writes.iter().take(2).zip([1u32, 2]) {
                let row = self.table.get(w.id).await.unwrap().unwrap();
                let key = self.ring.master_key(version).await.unwrap();
                let ct = record::encrypt(
                    &key,
                    Suite::default(),
                    &row.context,
                    format!("app wrote {} on v{version}", w.id).as_bytes(),
                )
                .unwrap();
                sqlx::query("UPDATE accounts SET secret = $2 WHERE id = $1::bigint")
                    .bind(w.id)
                    .bind(ct)
                    .execute(&self.pool)
                    .await
                    .unwrap();
            }
        }
        self.table.compare_and_swap_many(writes).await
    }
}

#[tokio::test]
async fn application_writes_racing_the_batch_write_are_never_lost() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, _clock) = keyring().await;
    bigint_accounts(&pool, &ring, "accounts", &(1..=100).collect::<Vec<_>>()).await;
    ring.rotate(&admin()).await.unwrap();
    let source = Arc::new(Meddling {
        table: accounts_source(&pool, "accounts").await,
        pool: pool.clone(),
        ring: ring.clone(),
        calls: AtomicU64::new(0),
        meddle_on: 2, // rows 41 and 42 (batches of 40)
    });
    let mut job = RewrapJob::builder(ring.clone(), vec![source.clone() as _])
        .options(options(40))
        .create()
        .unwrap();
    let totals = run_to_end(&mut job).await;
    assert_eq!(totals.conflicts, 2);
    // 41 (v1 app write) moved again; 42 (v2 app write) already there.
    assert_eq!(
        (totals.rewrapped, totals.skipped, totals.unresolved),
        (99, 1, 0)
    );
    assert_eq!(versions(&pool, "accounts").await, [(2, 100)].into());
    assert_decrypt(&pool, &ring, "accounts", |id| match id {
        "41" => "app wrote 41 on v1".to_owned(),
        "42" => "app wrote 42 on v2".to_owned(),
        _ => plaintext("accounts", id),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_running_application_updates_during_a_job_are_never_lost() {
    let db = TestDb::new().await;
    let pool = db.pool_with(8).await;
    let (ring, _clock) = keyring().await;
    let n = 3000i64;
    bigint_accounts(&pool, &ring, "accounts", &(1..=n).collect::<Vec<_>>()).await;
    ring.rotate(&admin()).await.unwrap();
    let table = accounts_source(&pool, "accounts").await;

    // The application: 600 updates of random rows under the active
    // version, each the row's new truth.
    let app = {
        let (pool, ring) = (pool.clone(), ring.clone());
        tokio::spawn(async move {
            let mut last = HashMap::new();
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for k in 0..600u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % n as u64) as i64 + 1;
                let id = i.to_string();
                let text = format!("app update {k} of {id}");
                let ctx = account_context("accounts", &id, &tenant_of(i), region_of(i).as_deref());
                let ct = ring.encrypt(&ctx, text.as_bytes()).await.unwrap();
                sqlx::query("UPDATE accounts SET secret = $2 WHERE id = $1")
                    .bind(i)
                    .bind(ct)
                    .execute(&pool)
                    .await
                    .unwrap();
                last.insert(id, text);
                tokio::task::yield_now().await;
            }
            last
        })
    };
    let mut job = RewrapJob::builder(ring.clone(), vec![Arc::new(table) as _])
        .options(options(50))
        .create()
        .unwrap();
    let totals = run_to_end(&mut job).await;
    let last = app.await.unwrap();
    assert_eq!(
        (totals.seen, totals.failed, totals.unresolved),
        (n as u64, 0, 0)
    );
    assert_eq!(versions(&pool, "accounts").await, [(2, n as usize)].into());
    assert_decrypt(&pool, &ring, "accounts", |id| {
        last.get(id)
            .cloned()
            .unwrap_or_else(|| plaintext("accounts", id))
    })
    .await;
}

#[tokio::test]
async fn configuration_errors_are_typed_and_names_are_never_spliced() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    sqlx::raw_sql(
        "CREATE TABLE ok (id bigint PRIMARY KEY, secret bytea, note text);
         CREATE TABLE nokey (id bigint, secret bytea);
         CREATE TABLE nullable (id bigint UNIQUE, secret bytea);
         CREATE TABLE texty (id bigint PRIMARY KEY, secret text);
         CREATE TABLE numeric_ids (id numeric PRIMARY KEY, secret bytea);
         CREATE TABLE \"Mixed\" (id uuid PRIMARY KEY, secret bytea);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let build = |table: &str, id: &str, ct: &str| {
        PgTable::builder(table).id_column(id).ciphertext_column(ct)
    };
    let err = |r: Result<PgTable, TableError>| r.unwrap_err();
    assert!(matches!(
        err(build("ok; DROP TABLE ok", "id", "secret")
            .build(&pool)
            .await),
        TableError::InvalidIdentifier { what: "table", .. }
    ));
    assert!(matches!(
        err(build("ok", "id\"", "secret").build(&pool).await),
        TableError::InvalidIdentifier { what: "column", .. }
    ));
    assert!(matches!(
        err(build("ok", "id", "secret")
            .schema("public.x")
            .build(&pool)
            .await),
        TableError::InvalidIdentifier { what: "schema", .. }
    ));
    assert!(matches!(
        err(build("ok", "id", "secret")
            .context_column("no te", "n")
            .build(&pool)
            .await),
        TableError::InvalidIdentifier { what: "column", .. }
    ));
    assert!(matches!(
        err(PgTable::builder("ok")
            .ciphertext_column("secret")
            .build(&pool)
            .await),
        TableError::MissingColumn("id")
    ));
    assert!(matches!(
        err(build("absent", "id", "secret").build(&pool).await),
        TableError::TableNotFound(t) if t == "public.absent"
    ));
    assert!(
        matches!(
            err(build("mixed", "id", "secret").build(&pool).await),
            TableError::TableNotFound(_)
        ),
        "names are case-sensitive"
    );
    build("Mixed", "id", "secret").build(&pool).await.unwrap();
    assert!(matches!(
        err(build("ok", "id", "nope").build(&pool).await),
        TableError::ColumnNotFound { column, .. } if column == "nope"
    ));
    assert!(matches!(
        err(build("nokey", "id", "secret").build(&pool).await),
        TableError::IdNotUnique { .. }
    ));
    assert!(matches!(
        err(build("nullable", "id", "secret").build(&pool).await),
        TableError::IdNotUnique { .. }
    ));
    assert!(matches!(
        err(build("texty", "id", "secret").build(&pool).await),
        TableError::CiphertextNotBytea { type_name, .. } if type_name == "text"
    ));
    assert!(matches!(
        err(build("numeric_ids", "id", "secret").build(&pool).await),
        TableError::UnsupportedIdType { type_name, .. } if type_name == "numeric"
    ));
    assert!(matches!(
        err(build("ok", "id", "secret")
            .context_column("note", "k")
            .context_constant("k", "v")
            .build(&pool)
            .await),
        TableError::DuplicateContextKey(k) if k == "k"
    ));
    // Bound values never become SQL: a hostile cursor or id is only a value.
    let ok = build("ok", "id", "secret").build(&pool).await.unwrap();
    assert!(ok.get("1; DROP TABLE ok").await.is_err());
    assert!(ok.fetch(Some("0) OR (1=1"), 10).await.is_err());
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM ok")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn split_ranges_hold_every_row_exactly_once() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, _clock) = keyring().await;
    let ids: Vec<i64> = (0..1000).map(|i| i * 7 - 3000).collect();
    bigint_accounts(&pool, &ring, "nums", &ids).await;
    let words: Vec<String> = (0..500).map(|i| format!("w{i}")).collect();
    text_accounts(&pool, &ring, "words", &words).await;
    text_accounts(&pool, &ring, "empty", &[]).await;
    text_accounts(&pool, &ring, "few", &["x".to_owned(), "y".to_owned()]).await;

    for (name, total) in [
        ("nums", 1000usize),
        ("words", 500),
        ("empty", 0),
        ("few", 2),
    ] {
        let table = accounts_source(&pool, name).await;
        for n in [1u32, 2, 4, 7] {
            let ranges = table.split(n).await.unwrap();
            assert!(
                !ranges.is_empty() && ranges.len() <= n as usize,
                "{name}/{n}: {ranges:?}"
            );
            assert_eq!(ranges.first().unwrap().start, None);
            assert_eq!(ranges.last().unwrap().end, None);
            let mut seen = BTreeSet::new();
            let mut counted = 0;
            for r in &ranges {
                let part = table.with_range(r.clone());
                counted += part.count_rows().await.unwrap();
                for id in ids_in(&part, 64).await {
                    assert!(seen.insert(id.clone()), "{name}/{n}: {id} in two ranges");
                }
                assert_eq!(part.rows_read() as i64, part.count_rows().await.unwrap());
            }
            assert_eq!(seen.len(), total, "{name}/{n}");
            assert_eq!(counted as usize, total);
            if total >= 100 {
                assert_eq!(ranges.len(), n as usize, "{name}/{n}");
            }
        }
    }
}

/// A table holding every tenant's rows, scoped to one tenant: every read,
/// count, split and write sees that tenant's rows only.
#[tokio::test]
async fn a_scoped_table_reads_splits_and_writes_one_tenants_rows_only() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let (ring, _clock) = keyring().await;
    let ids: Vec<i64> = (1..=400).collect();
    bigint_accounts(&pool, &ring, "shared", &ids).await;
    let t1: BTreeSet<String> = ids
        .iter()
        .filter(|&&i| tenant_of(i) == "t1")
        .map(i64::to_string)
        .collect();
    let scoped = |tenant: &'static str| {
        PgTable::builder("shared")
            .id_column("id")
            .ciphertext_column("secret")
            .context_column("id", "row")
            .context_column("tenant", "tenant")
            .context_column_with("region", "region", OnNull::Omit)
            .context_constant("table", "shared")
            .scope("tenant", tenant)
            .build(&pool)
    };
    let table = scoped("t1").await.unwrap();
    assert_eq!(table.count_rows().await.unwrap(), t1.len() as i64);
    let seen: BTreeSet<String> = ids_in(&table, 33).await.into_iter().collect();
    assert_eq!(seen, t1);

    // Shards of the scoped table: split among t1's ids, each read once.
    let mut split_seen = BTreeSet::new();
    for r in table.split(4).await.unwrap() {
        for id in ids_in(&table.with_range(r), 16).await {
            assert!(split_seen.insert(id.clone()), "{id} in two shards");
        }
    }
    assert_eq!(split_seen, t1);

    // Another tenant's row is not there, for a read or a write.
    let other = ids
        .iter()
        .find(|&&i| tenant_of(i) == "t2")
        .unwrap()
        .to_string();
    assert!(table.get(&other).await.unwrap().is_none());
    let before: Vec<u8> = sqlx::query_scalar("SELECT secret FROM shared WHERE id = $1")
        .bind(other.parse::<i64>().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        table.compare_and_swap(&other, &before, b"x").await.unwrap(),
        CasOutcome::Conflict
    );
    let writes = [CasWrite {
        id: &other,
        expected: &before,
        new: b"y",
    }];
    assert_eq!(
        table.compare_and_swap_many(&writes).await.unwrap(),
        [CasOutcome::Conflict]
    );

    // A rewrap job over the scoped table moves t1's rows and nobody else's.
    ring.rotate(&admin()).await.unwrap();
    let target = ring.active_version().unwrap();
    let sources: Vec<Arc<dyn RowSource>> = vec![Arc::new(table.clone())];
    let mut job = RewrapJob::builder(ring.clone(), sources)
        .options(options(50))
        .create()
        .unwrap();
    let totals = run_to_end(&mut job).await;
    assert_eq!(totals.rewrapped, t1.len() as u64);
    for (id, tenant, _, ct) in rows(&pool, "shared").await {
        let version = keyfold_core::format::inspect(&ct).unwrap().key_version;
        assert_eq!(version == target, tenant == "t1", "row {id} of {tenant}");
    }

    // The scope column is checked like every other name.
    assert!(matches!(
        PgTable::builder("shared")
            .id_column("id")
            .ciphertext_column("secret")
            .scope("tenant; DROP TABLE shared", "t1")
            .build(&pool)
            .await,
        Err(TableError::InvalidIdentifier { .. })
    ));
    assert!(matches!(
        PgTable::builder("shared")
            .id_column("id")
            .ciphertext_column("secret")
            .scope("no_such_column", "t1")
            .build(&pool)
            .await,
        Err(TableError::ColumnNotFound { .. })
    ));
    // A hostile value is a value, never SQL.
    let hostile = scoped("t1' OR '1'='1").await.unwrap();
    assert_eq!(hostile.count_rows().await.unwrap(), 0);
}
