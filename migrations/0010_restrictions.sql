-- Last-digit restriction ETL: each violating pass with its rule, and daily summaries.
CREATE TABLE IF NOT EXISTS restriction_violations (
    pass_id       VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    rule_id       VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    plate         VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    plate_color   TINYINT      NOT NULL,
    checkpoint_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    ts            BIGINT       NOT NULL,
    day           CHAR(10)     CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    PRIMARY KEY (pass_id, rule_id),
    KEY restriction_violations_by_day (day, checkpoint_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS restriction_summary (
    day           CHAR(10)     CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    checkpoint_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    rule_id       VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    violations    INT          NOT NULL,
    vehicles      INT          NOT NULL,
    PRIMARY KEY (day, checkpoint_id, rule_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
