-- Daily summary of sensor readings, one row per station and day.
CREATE TABLE IF NOT EXISTS readings (
    station_id   INTEGER NOT NULL REFERENCES stations(id),
    taken_at     TIMESTAMP NOT NULL,
    temperature  REAL,
    humidity     REAL,
    PRIMARY KEY (station_id, taken_at)
);

SELECT s.name,
       DATE(r.taken_at)      AS day,
       MIN(r.temperature)    AS low,
       MAX(r.temperature)    AS high,
       AVG(r.humidity)       AS humidity
FROM readings r
JOIN stations s ON s.id = r.station_id
WHERE r.taken_at >= DATE('now', '-7 days')
GROUP BY s.name, DATE(r.taken_at)
ORDER BY s.name, day;
