-- imflow's embedded store (standalone mode).
CREATE TABLE users (
    user_id    TEXT PRIMARY KEY,
    nickname   TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE groups (
    group_id   TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    owner      TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

-- role: 1 owner, 2 admin, 3 member
CREATE TABLE group_members (
    group_id  TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    role      INTEGER NOT NULL,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
) WITHOUT ROWID;
CREATE INDEX group_members_by_user ON group_members (user_id, group_id);

-- The durable history. Rows are appended in commit order (rowid), so a
-- commit writes a few consecutive pages however many conversations it
-- touches; the unique index on (conversation_id, seq) has small entries, and
-- makes replaying a batch store nothing twice. A conversation's max seq is
-- the last key of its index range (a seek), so no counter table is kept:
-- every extra random page written per message costs commit throughput.
CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    server_msg_id   TEXT NOT NULL,
    client_msg_id   TEXT NOT NULL,
    sender          TEXT NOT NULL,
    send_time       INTEGER NOT NULL,
    body            TEXT NOT NULL
);
CREATE UNIQUE INDEX messages_by_conversation ON messages (conversation_id, seq);
-- Time order, for loading the resend index at start. Appends only: new
-- messages land on the last page, unlike an index on the resend key would.
CREATE INDEX messages_by_time ON messages (send_time);

-- Single chats a user takes part in, and read seqs of any conversation.
CREATE TABLE user_conversations (
    user_id         TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    read_seq        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, conversation_id)
) WITHOUT ROWID;

-- Tokens carry the generation current when they were issued; logout bumps
-- it, which revokes every older token of that user and platform.
CREATE TABLE token_generations (
    user_id    TEXT NOT NULL,
    platform   INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY (user_id, platform)
) WITHOUT ROWID;

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
