import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Numba compiles on first call: keep deadlines off, and examples modest so the suite stays fast.
settings.register_profile(
    "edgeformer",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Under emulation (tests/aarch64/run.sh) compilation is ~10x and float code ~100x slower.
settings.register_profile(
    "emulated",
    deadline=None,
    max_examples=6,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "edgeformer"))
