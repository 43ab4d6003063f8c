-- The mirror of Durable Streams in Postgres, written by ds-sync.
--
-- Offsets and paths use the "C" collation: the protocol promises that offsets sort
-- lexicographically (byte order), and the start sentinel '-1' must sort before every real offset.
-- A locale collation may ignore punctuation and put '-1' after '0000…', and it also keeps
-- `LIKE 'prefix%'` from using the index.

-- One row per stream that ds-sync knows of: where to resume and what became of the stream.
CREATE TABLE ds_checkpoints (
    stream        text COLLATE "C" PRIMARY KEY,
    -- The offset to resume reading from: '-1' until the first read commits, then the
    -- streamNextOffset / Stream-Next-Offset of the last committed read.
    next_offset   text COLLATE "C" NOT NULL DEFAULT '-1',
    -- The stream's content type, learned from HEAD before the first read.
    content_type  text,
    -- Set once the server signalled end of stream; the stream is no longer followed.
    closed        boolean NOT NULL DEFAULT false,
    -- Set when the server answered 404 or 410; the stream is no longer followed.
    deleted       boolean NOT NULL DEFAULT false,
    -- The HTTP status that marked the stream deleted (404 or 410).
    deleted_status smallint,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per message of a JSON stream, or per data chunk of any other stream.
CREATE TABLE ds_messages (
    stream        text COLLATE "C" NOT NULL,
    -- The offset at which the read that delivered this row began (the previous next offset).
    stream_offset text COLLATE "C" NOT NULL,
    -- The row's position within that read, from 0.
    idx           integer NOT NULL,
    content_type  text NOT NULL,
    -- The message, for application/json streams.
    data          jsonb,
    -- The bytes, for every other stream.
    bytes         bytea,
    -- When the worker received the read from the server.
    received_at   timestamptz NOT NULL,
    -- The unique key is also the replay order: (stream, stream_offset, idx).
    PRIMARY KEY (stream, stream_offset, idx),
    CHECK ((data IS NULL) <> (bytes IS NULL))
);

-- "What arrived recently, across streams": time-range scans.
CREATE INDEX ds_messages_received_at ON ds_messages (received_at);
-- Lag and status dashboards: streams still followed.
CREATE INDEX ds_checkpoints_live ON ds_checkpoints (updated_at) WHERE NOT closed AND NOT deleted;
-- Containment queries on JSON messages: data @> '{"type":"order.paid"}'.
CREATE INDEX ds_messages_data ON ds_messages USING gin (data jsonb_path_ops);
