-- Flow counts per level, key and window (ARCHITECTURE.md: flow_counts).
CREATE TABLE IF NOT EXISTS flow_counts (
    level        VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    key_id       VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    window_s     INT          NOT NULL,
    window_start BIGINT       NOT NULL,
    passes       BIGINT       NOT NULL,
    revision     INT          NOT NULL,
    PRIMARY KEY (level, key_id, window_s, window_start),
    KEY flow_counts_time (window_s, window_start)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Passes that arrived too late for some window, naming what they missed (late_passes).
CREATE TABLE IF NOT EXISTS late_passes (
    pass_id       VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    pipelines     VARCHAR(1024) NOT NULL,
    checkpoint_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    ts            BIGINT       NOT NULL,
    arrived_at    BIGINT       NOT NULL,
    record        MEDIUMTEXT   CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    PRIMARY KEY (pass_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
