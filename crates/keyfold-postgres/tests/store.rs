//! PgKeyringStore against a real PostgreSQL server (KEYFOLD_PG_URL).

mod support;

#[tokio::test]
async fn harness_gives_each_test_its_own_database() {
    let a = support::TestDb::new().await;
    let b = support::TestDb::new().await;
    assert_ne!(a.name, b.name);
    let pool = a.pool().await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(db, a.name);
    keyfold_postgres::migrate(&pool, &keyfold_postgres::TablePrefix::default())
        .await
        .unwrap();
}
