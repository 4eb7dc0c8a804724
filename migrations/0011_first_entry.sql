-- Each vehicle's first entry into the city (its earliest inbound boundary pass); a
-- correction raises the revision.
CREATE TABLE IF NOT EXISTS first_entry (
    plate         VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    plate_color   TINYINT      NOT NULL,
    ts            BIGINT       NOT NULL,
    checkpoint_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    pass_id       VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    revision      INT          NOT NULL,
    PRIMARY KEY (plate, plate_color)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
