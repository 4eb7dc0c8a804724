-- Radar spot speeds per checkpoint and window (checkpoint_speed).
CREATE TABLE IF NOT EXISTS checkpoint_speed (
    checkpoint_id  VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    window_s       INT          NOT NULL,
    window_start   BIGINT       NOT NULL,
    samples        INT          NOT NULL,
    mean_speed_kmh DOUBLE       NOT NULL,
    revision       INT          NOT NULL,
    PRIMARY KEY (checkpoint_id, window_s, window_start)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
