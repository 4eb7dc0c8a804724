-- Alerts of every kind (cloned_plate, traffic_surge, sudden_congestion, watchlist, device
-- health), keyed by an id derived from their cause. Acknowledgement is kept apart from the
-- upserted columns, so a re-emitted alert never clears it.
CREATE TABLE IF NOT EXISTS alerts (
    alert_id        VARCHAR(80)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    kind            VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    ts              BIGINT       NOT NULL,
    plate           VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    plate_color     TINYINT      NULL,
    checkpoint_id   VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    segment_id      VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    severity        VARCHAR(16)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    details         TEXT         NOT NULL,
    status          VARCHAR(16)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    revision        INT          NOT NULL,
    acknowledged_by VARCHAR(64)  NULL,
    acknowledged_at BIGINT       NULL,
    PRIMARY KEY (alert_id),
    KEY alerts_by_time (kind, ts),
    KEY alerts_by_plate (plate, plate_color, ts)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
