//! The schema and readiness: migrations apply once even when several workers start together, and
//! `/readyz`'s check tells an unmigrated database from a ready one.

mod support;

use ds_sync::config::Config;
use support::TestDb;

fn config_for(db: &TestDb) -> Config {
    Config {
        database_url: Some(db.url.clone()),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_requires_every_migration() {
    let db = TestDb::create().await;
    let config = config_for(&db);
    let pool = ds_sync::db::pool(&config).unwrap_or_else(|e| panic!("{e}"));
    let before = ds_sync::db::check_ready(&pool).await;
    assert!(
        matches!(before, Err(ds_sync::db::DbError::NotMigrated { .. })),
        "{before:?}"
    );
    ds_sync::db::migrate(&config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ds_sync::db::check_ready(&pool)
        .await
        .unwrap_or_else(|e| panic!("ready after migrating: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_starting_together_migrate_once() {
    let db = TestDb::create().await;
    let config = config_for(&db);
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move { ds_sync::db::migrate(&config).await })
        })
        .collect();
    for run in runs {
        run.await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("concurrent migrate failed: {e}"));
    }
    let pg = db.client().await;
    let applied: i64 = pg
        .query_one("SELECT count(*) FROM _sqlx_migrations", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(applied, ds_sync::db::MIGRATOR.iter().count() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_sort_in_byte_order_with_the_start_sentinel_first() {
    // The mirror's replay order is ORDER BY stream_offset, idx: it must be byte order whatever
    // the database's locale, with '-1' (the first read of a stream) before every real offset.
    let db = TestDb::create().await;
    ds_sync::db::migrate(&config_for(&db))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pg = db.client().await;
    pg.batch_execute(
        "INSERT INTO ds_messages (stream, stream_offset, idx, content_type, bytes, received_at) VALUES \
         ('/s', '0000000000000000_0000000000000010', 0, 'b', 'c', now()), \
         ('/s', '-1', 1, 'b', 'b', now()), \
         ('/s', '-1', 0, 'b', 'a', now()), \
         ('/s', '0000000000000001_0000000000000000', 0, 'b', 'd', now())",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let rows = pg
        .query(
            "SELECT bytes FROM ds_messages WHERE stream = '/s' ORDER BY stream_offset, idx",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let order: Vec<u8> = rows.iter().flat_map(|r| r.get::<_, Vec<u8>>(0)).collect();
    assert_eq!(order, b"abcd");
}
