-- A path can hold several streams over time: a stream deleted (or expired) and created again at
-- the same path is a new stream whose offsets start again. ds-sync numbers the streams it mirrors
-- at one path, from 1: each is an *incarnation*. The number is ds-sync's own (the protocol gives a
-- stream no identity beyond its path); it only grows, and may skip values.
--
-- ds_checkpoints keeps one row per path, describing its latest incarnation; ds_messages keeps the
-- rows of every incarnation, so what was mirrored before a delete stays queryable.

-- The incarnation the row's next_offset, closed and deleted describe. Rows that existed before
-- this migration describe the first one.
ALTER TABLE ds_checkpoints ADD COLUMN incarnation integer NOT NULL DEFAULT 1;

-- Which incarnation of `stream` a row belongs to. Rows mirrored before this migration belong to
-- the first; from now on the writer always names it, so there is no default to hide a mistake.
ALTER TABLE ds_messages ADD COLUMN incarnation integer NOT NULL DEFAULT 1;
ALTER TABLE ds_messages ALTER COLUMN incarnation DROP DEFAULT;

-- Offsets restart in every incarnation, so the incarnation is part of the key, which is also the
-- replay order: (stream, incarnation, stream_offset, idx).
ALTER TABLE ds_messages DROP CONSTRAINT ds_messages_pkey;
ALTER TABLE ds_messages ADD PRIMARY KEY (stream, incarnation, stream_offset, idx);

-- The rows of each path's latest incarnation: the stream the server holds now (or held last, when
-- ds_checkpoints says deleted). Filtering on stream uses the primary key on both tables.
CREATE VIEW ds_current_messages AS
SELECT m.*
FROM ds_messages m
JOIN ds_checkpoints c ON c.stream = m.stream AND c.incarnation = m.incarnation;
