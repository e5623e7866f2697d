#!/bin/sh
# Copy the day's logs to the backup disk, keeping the last seven days.
set -eu

SRC=/var/log/sensors
DEST=/mnt/backup/sensors
today=$(date +%Y-%m-%d)

if ! mountpoint -q /mnt/backup; then
    echo "backup disk not mounted" >&2
    exit 1
fi

mkdir -p "$DEST/$today"
for f in "$SRC"/*.log; do
    [ -e "$f" ] || continue
    gzip -c "$f" > "$DEST/$today/$(basename "$f").gz"
done

find "$DEST" -mindepth 1 -maxdepth 1 -type d -mtime +7 -exec rm -rf {} +
echo "backed up $(ls "$DEST/$today" | wc -l) files"
