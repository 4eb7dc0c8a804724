-- Vehicles with at least N passes at one checkpoint in one local day (high_frequency).
CREATE TABLE IF NOT EXISTS high_frequency (
    day           CHAR(10)     CHARACTER SET ascii NOT NULL,
    checkpoint_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    plate         VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    plate_color   TINYINT      NOT NULL,
    passes        INT          NOT NULL,
    first_ts      BIGINT       NOT NULL,
    last_ts       BIGINT       NOT NULL,
    PRIMARY KEY (day, checkpoint_id, plate, plate_color)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
