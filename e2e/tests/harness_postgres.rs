//! The harness's Postgres works here: the fallback chain yields a usable database, and a Postgres
//! the harness owns (a local cluster, or a container under DS_E2E_POSTGRES=testcontainers)
//! survives kill -9 with its committed rows (what the crash e2e tests rely on).

use ds_e2e::postgres::{Postgres, connect};

#[tokio::test]
async fn fallback_chain_yields_a_database_that_accepts_writes() {
    let pg = Postgres::start().await.expect("some postgres");
    let client = connect(&pg.url).await.expect("connect");
    client
        .batch_execute("CREATE TABLE probe (id int PRIMARY KEY); INSERT INTO probe VALUES (7)")
        .await
        .expect("write");
    let row = client
        .query_one("SELECT id FROM probe", &[])
        .await
        .expect("read");
    assert_eq!(row.get::<_, i32>(0), 7, "source: {}", pg.source());
    if std::env::var(ds_e2e::postgres::SOURCE_VAR).is_ok() {
        assert_eq!(pg.source(), "testcontainers");
    }
}

#[tokio::test]
async fn an_owned_postgres_keeps_committed_rows_across_kill_and_restart() {
    let mut pg = Postgres::start_owned()
        .await
        .expect("a Postgres the harness owns");
    let client = connect(&pg.url).await.expect("connect");
    client
        .batch_execute("CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (1), (2)")
        .await
        .expect("write");
    drop(client);

    pg.kill().await.expect("kill -9 postmaster");
    assert!(
        connect(&pg.url).await.is_err(),
        "postgres still answers after kill"
    );
    pg.restart().await.expect("restart with crash recovery");

    let client = connect(&pg.url).await.expect("reconnect at the same url");
    let row = client
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .expect("read");
    assert_eq!(row.get::<_, i64>(0), 2);
}
