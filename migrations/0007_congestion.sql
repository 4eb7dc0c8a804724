-- Congestion per segment (segment_congestion) and per region and city (area_congestion).
CREATE TABLE IF NOT EXISTS segment_congestion (
    segment_id        VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    window_s          INT          NOT NULL,
    window_start      BIGINT       NOT NULL,
    traversals        INT          NOT NULL,
    mean_speed_kmh    DOUBLE       NOT NULL,
    travel_time_index DOUBLE       NOT NULL,
    congestion_level  TINYINT      NOT NULL,
    revision          INT          NOT NULL,
    PRIMARY KEY (segment_id, window_s, window_start)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS area_congestion (
    level             VARCHAR(16)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    key_id            VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    window_s          INT          NOT NULL,
    window_start      BIGINT       NOT NULL,
    mean_speed_kmh    DOUBLE       NOT NULL,
    travel_time_index DOUBLE       NOT NULL,
    congestion_level  TINYINT      NOT NULL,
    revision          INT          NOT NULL,
    PRIMARY KEY (level, key_id, window_s, window_start)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
