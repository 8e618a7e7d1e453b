-- Files (PROTOCOL v2): what a user declared with POST /files, whether its
-- bytes arrived in full, and the conversations it was sent in (whose
-- readers may download it). In a group, `members_to` is the newest first
-- readable seq among the members when it was sent: a member who came later
-- (a larger first readable seq) never read that message.
CREATE TABLE files (
    file_id      VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    owner        VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    name         VARCHAR(1024) NOT NULL,
    size         BIGINT NOT NULL,
    content_type VARCHAR(255) NOT NULL,
    created_at   BIGINT NOT NULL,
    complete     TINYINT NOT NULL DEFAULT 0
) ENGINE = InnoDB;

CREATE TABLE file_conversations (
    file_id         VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    conversation_id VARCHAR(160) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    members_to      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (file_id, conversation_id)
) ENGINE = InnoDB;
