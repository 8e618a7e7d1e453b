-- PROTOCOL v2: profiles, group administration, history visibility,
-- conversation settings, blocks, devices.
ALTER TABLE users
    ADD COLUMN avatar_url VARCHAR(1024) NOT NULL DEFAULT '',
    ADD COLUMN last_seen BIGINT NOT NULL DEFAULT 0;

ALTER TABLE `groups`
    ADD COLUMN notice VARCHAR(4096) NOT NULL DEFAULT '',
    ADD COLUMN avatar_url VARCHAR(1024) NOT NULL DEFAULT '',
    ADD COLUMN muted TINYINT NOT NULL DEFAULT 0,
    ADD COLUMN dismissed TINYINT NOT NULL DEFAULT 0;

-- The first seq a member may read: that of the notification that added
-- them; NULL until it is stored. Members from before read from 1.
ALTER TABLE group_members
    ADD COLUMN min_seq BIGINT UNSIGNED NULL DEFAULT 1,
    ADD COLUMN muted_until BIGINT NOT NULL DEFAULT 0;

ALTER TABLE user_conversations
    ADD COLUMN pinned TINYINT NOT NULL DEFAULT 0,
    ADD COLUMN muted TINYINT NOT NULL DEFAULT 0,
    ADD COLUMN changed_at BIGINT NOT NULL DEFAULT 0;

CREATE TABLE blocks (
    user_id    VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    blocked_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, blocked_id)
) ENGINE = InnoDB;

CREATE TABLE devices (
    user_id    VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    platform   TINYINT NOT NULL,
    push_token VARCHAR(4096) NOT NULL,
    provider   VARCHAR(64) NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, platform)
) ENGINE = InnoDB;
