"""Plan watering times from soil moisture readings."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass
class Reading:
    when: dt.datetime
    moisture: float  # 0 = dry, 1 = saturated


def next_watering(readings: list[Reading], threshold: float = 0.35) -> dt.datetime | None:
    """Return the first time moisture falls below ``threshold``, extrapolating linearly."""
    if len(readings) < 2:
        return None
    first, last = readings[0], readings[-1]
    hours = (last.when - first.when).total_seconds() / 3600
    slope = (last.moisture - first.moisture) / hours if hours else 0.0
    if slope >= 0:
        return None
    return last.when + dt.timedelta(hours=(threshold - last.moisture) / slope)
