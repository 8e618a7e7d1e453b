-- Items a sink stage (a webhook) gave up on after its retries: kept for an
-- operator to read and replay, in the order they were given up.
CREATE TABLE dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    stage           TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    server_msg_id   TEXT NOT NULL,
    body            TEXT NOT NULL,
    error           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    at_ms           INTEGER NOT NULL
);
CREATE INDEX dead_letters_by_stage ON dead_letters (stage, id);
