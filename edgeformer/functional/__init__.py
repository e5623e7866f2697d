"""Functional API: the runtime's special kernels callable on plain arrays, without a graph.

- ``edgeformer.functional.memory_layer``: MemoryFormer table projections (hash, weights, gather).
- ``edgeformer.functional.binary_hash``: EcoFormer kernelized hashing and binary-hash attention.
"""
