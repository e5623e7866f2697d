"""linear weight format ``lut`` (MemoryFormer-style table projections). Being written."""
