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
        "INSERT INTO ds_messages \
           (stream, incarnation, stream_offset, idx, content_type, bytes, received_at) VALUES \
         ('/s', 1, '0000000000000000_0000000000000010', 0, 'b', 'c', now()), \
         ('/s', 1, '-1', 1, 'b', 'b', now()), \
         ('/s', 1, '-1', 0, 'b', 'a', now()), \
         ('/s', 1, '0000000000000001_0000000000000000', 0, 'b', 'd', now())",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incarnations_of_one_path_share_offsets_and_the_view_shows_the_latest() {
    // A path deleted and created again restarts its offsets: the same (stream_offset, idx) in
    // two incarnations must both fit, and ds_current_messages must show only the latest.
    let db = TestDb::create().await;
    ds_sync::db::migrate(&config_for(&db))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pg = db.client().await;
    pg.batch_execute(
        "INSERT INTO ds_checkpoints (stream, incarnation, next_offset) VALUES ('/p', 2, 'x'); \
         INSERT INTO ds_messages \
           (stream, incarnation, stream_offset, idx, content_type, bytes, received_at) VALUES \
         ('/p', 1, '-1', 0, 'b', 'old', now()), \
         ('/p', 2, '-1', 0, 'b', 'new', now())",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let current: Vec<Vec<u8>> = pg
        .query(
            "SELECT bytes FROM ds_current_messages WHERE stream = '/p' ORDER BY stream_offset, idx",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(current, vec![b"new".to_vec()]);
    let history: Vec<Vec<u8>> = pg
        .query(
            "SELECT bytes FROM ds_messages WHERE stream = '/p' \
             ORDER BY incarnation, stream_offset, idx",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(history, vec![b"old".to_vec(), b"new".to_vec()]);
    // The key still refuses a true duplicate.
    let duplicate = pg
        .execute(
            "INSERT INTO ds_messages \
               (stream, incarnation, stream_offset, idx, content_type, bytes, received_at) \
             VALUES ('/p', 2, '-1', 0, 'b', 'again', now())",
            &[],
        )
        .await;
    assert!(duplicate.is_err(), "a duplicate key was accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_a_mirror_keeps_its_rows_as_their_first_incarnation() {
    // A database mirrored before incarnations existed: every migration before the incarnations
    // one applied, rows and checkpoints in it; then that migration and every later one.
    let db = TestDb::create().await;
    let pg = db.client().await;
    let migrations: Vec<_> = ds_sync::db::MIGRATOR.iter().collect();
    let split = migrations
        .iter()
        .position(|m| m.description.contains("incarnations"))
        .unwrap_or_else(|| panic!("no incarnations migration"));
    let (earlier, later) = migrations.split_at(split);
    for migration in earlier {
        pg.batch_execute(&migration.sql)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", migration.description));
    }
    pg.batch_execute(
        "INSERT INTO ds_checkpoints (stream, next_offset) VALUES ('/old', 'x'); \
         INSERT INTO ds_messages (stream, stream_offset, idx, content_type, data, received_at) \
         VALUES ('/old', '-1', 0, 'application/json', '{\"a\":1}', now())",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for migration in later {
        pg.batch_execute(&migration.sql)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", migration.description));
    }
    let row = pg
        .query_one(
            "SELECT m.incarnation, c.incarnation, \
                    (SELECT count(*) FROM ds_current_messages WHERE stream = '/old') \
             FROM ds_messages m JOIN ds_checkpoints c USING (stream)",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (message, checkpoint, current): (i32, i32, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((message, checkpoint, current), (1, 1, 1));
    // Mirrored before stream ids existed: the id is learned later, not guessed.
    let stream_id: Option<String> = pg
        .query_one(
            "SELECT stream_id FROM ds_checkpoints WHERE stream = '/old'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get(0);
    assert_eq!(stream_id, None);
}
