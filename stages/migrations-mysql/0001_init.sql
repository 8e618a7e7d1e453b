-- imflow's directory in MySQL/MariaDB (cluster mode). Ids are
-- compared byte for byte (`utf8mb4_bin`): "Bob" and "bob" are two users, as in
-- standalone mode.
CREATE TABLE users (
    user_id    VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    nickname   VARCHAR(255) NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE `groups` (
    group_id   VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    name       VARCHAR(255) NOT NULL,
    owner      VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- role: 1 owner, 2 admin, 3 member. `joined` orders members by arrival.
CREATE TABLE group_members (
    group_id  VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    user_id   VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    role      TINYINT NOT NULL,
    joined    BIGINT NOT NULL AUTO_INCREMENT UNIQUE,
    PRIMARY KEY (group_id, user_id),
    KEY group_members_by_user (user_id, group_id)
) ENGINE = InnoDB;

-- Single chats a user takes part in, and read seqs of any conversation.
CREATE TABLE user_conversations (
    user_id         VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    conversation_id VARCHAR(160) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    read_seq        BIGINT UNSIGNED NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, conversation_id)
) ENGINE = InnoDB;

-- Tokens carry the generation current when they were issued; logout bumps
-- it, which revokes every older token of that user and platform.
CREATE TABLE token_generations (
    user_id    VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    platform   TINYINT NOT NULL,
    generation BIGINT UNSIGNED NOT NULL,
    PRIMARY KEY (user_id, platform)
) ENGINE = InnoDB;

CREATE TABLE settings (
    name  VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
) ENGINE = InnoDB;
