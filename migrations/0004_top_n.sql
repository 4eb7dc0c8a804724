-- The N busiest keys in a sliding window; a corrected window is replaced whole (top_n).
CREATE TABLE IF NOT EXISTS top_n (
    metric     VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    window_s   INT          NOT NULL,
    slide_s    INT          NOT NULL,
    window_end BIGINT       NOT NULL,
    `rank`     INT          NOT NULL,
    key_id     VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    value      BIGINT       NOT NULL,
    PRIMARY KEY (metric, window_s, slide_s, window_end, `rank`)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
