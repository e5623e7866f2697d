"""attention kind ``binary_hash`` (EcoFormer). Being written."""
