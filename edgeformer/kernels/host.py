"""What the host CPU offers the kernels (LLVM's feature names) and whether Numba targets another CPU.

Kernels that emit instructions a CPU may lack (VNNI, AVX512-BF16, permutes of the table GELU) decide in
Python, before compiling, from these two answers: with NUMBA_CPU_NAME / NUMBA_CPU_FEATURES set the host's
features say nothing about the target, so every such choice falls back to portable code."""
import os

import llvmlite.binding as _llb
from numba.core import config as _config


def host_features() -> dict:
    return dict(_llb.get_host_cpu_features())


def cpu_overridden() -> bool:
    """True when Numba is told to compile for a CPU other than the host (then host features say nothing)."""
    return bool(_config.CPU_NAME or _config.CPU_FEATURES or os.environ.get("NUMBA_CPU_NAME")
                or os.environ.get("NUMBA_CPU_FEATURES"))
