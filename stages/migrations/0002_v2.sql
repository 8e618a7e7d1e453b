-- PROTOCOL v2: profiles, group administration, history visibility,
-- conversation settings, blocks, devices.
ALTER TABLE users ADD COLUMN avatar_url TEXT NOT NULL DEFAULT '';
ALTER TABLE users ADD COLUMN last_seen INTEGER NOT NULL DEFAULT 0;

ALTER TABLE groups ADD COLUMN notice TEXT NOT NULL DEFAULT '';
ALTER TABLE groups ADD COLUMN avatar_url TEXT NOT NULL DEFAULT '';
ALTER TABLE groups ADD COLUMN muted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN dismissed INTEGER NOT NULL DEFAULT 0;

-- The first seq a member may read: that of the notification that added
-- them; NULL until it is stored. Members from before read from 1.
ALTER TABLE group_members ADD COLUMN min_seq INTEGER DEFAULT 1;
ALTER TABLE group_members ADD COLUMN muted_until INTEGER NOT NULL DEFAULT 0;

ALTER TABLE user_conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE user_conversations ADD COLUMN muted INTEGER NOT NULL DEFAULT 0;
-- When the user last read or changed the settings (ms), for `sync`'s since.
ALTER TABLE user_conversations ADD COLUMN changed_at INTEGER NOT NULL DEFAULT 0;

CREATE TABLE blocks (
    user_id    TEXT NOT NULL,
    blocked_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, blocked_id)
) WITHOUT ROWID;

CREATE TABLE devices (
    user_id    TEXT NOT NULL,
    platform   INTEGER NOT NULL,
    push_token TEXT NOT NULL,
    provider   TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, platform)
) WITHOUT ROWID;
