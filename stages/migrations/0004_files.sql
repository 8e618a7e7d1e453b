-- Files (PROTOCOL v2): what a user declared with POST /files, whether its
-- bytes arrived in full, and the conversations it was sent in (whose
-- readers may download it). In a group, `members_to` is the newest first
-- readable seq among the members when it was sent: a member who came later
-- (a larger first readable seq) never read that message.
CREATE TABLE files (
    file_id      TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    name         TEXT NOT NULL,
    size         INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    complete     INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE file_conversations (
    file_id         TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    members_to      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (file_id, conversation_id)
) WITHOUT ROWID;
