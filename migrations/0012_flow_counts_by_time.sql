-- The read API lists a level's flows over a time range without naming a key.
CREATE INDEX flow_counts_by_time ON flow_counts (level, window_s, window_start);
