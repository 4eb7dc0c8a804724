-- Records that could not be accepted, with their reason (ARCHITECTURE.md: dead_letters).
CREATE TABLE IF NOT EXISTS dead_letters (
    id          VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    reason      VARCHAR(64)  NOT NULL,
    record      MEDIUMTEXT   CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    received_at BIGINT       NOT NULL,
    PRIMARY KEY (id),
    KEY dead_letters_reason (reason)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
