-- A vehicle's passes of one local day in time order (trajectories); JSON arrays.
CREATE TABLE IF NOT EXISTS trajectories (
    plate       VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    plate_color TINYINT     NOT NULL,
    day         CHAR(10)    CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    passes      INT         NOT NULL,
    times       MEDIUMTEXT  NOT NULL,
    checkpoints MEDIUMTEXT  NOT NULL,
    intervals_s MEDIUMTEXT  NOT NULL,
    revision    INT         NOT NULL,
    PRIMARY KEY (plate, plate_color, day)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
