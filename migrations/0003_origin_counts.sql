-- Distinct vehicles per region and 5 min window by plate origin (ARCHITECTURE.md: origin_counts).
CREATE TABLE IF NOT EXISTS origin_counts (
    region_id       VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    window_s        INT          NOT NULL,
    window_start    BIGINT       NOT NULL,
    origin_province VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    origin_city     VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    scope           VARCHAR(16)  NOT NULL,
    vehicles        BIGINT       NOT NULL,
    revision        INT          NOT NULL,
    PRIMARY KEY (region_id, window_s, window_start, origin_province, origin_city),
    KEY origin_counts_time (window_s, window_start)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
