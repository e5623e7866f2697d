"""aarch64 only: the int8 kernel Numba compiles for this CPU uses sdot exactly when the CPU has dotprod.

Run under qemu as a Pi 4 (NUMBA_CPU_NAME=cortex-a72: no dotprod, so no sdot/udot may appear — qemu would
SIGILL on it anyway) and as a Pi 5 (cortex-a76: the selected path is sdot and its code has sdot). The kernel
is compiled afresh (never from the Numba cache) so the assembly is the one LLVM emits for this target.
The cross-compiled variant of the same check runs on every host in tests/test_gemm_s8.py.
"""
import platform

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("aarch64", "arm64"), reason="aarch64 only")


def _dot_instructions(asm):
    lines = [ln.split("//")[0].strip().split() for ln in asm.splitlines()]
    return sorted({ln[0] for ln in lines if ln and ln[0] in ("sdot", "udot", "usdot", "sudot")})


def test_selected_int8_kernel_matches_the_cpu():
    import numba

    from edgeformer.kernels import gemm_s8 as g

    path = g.select_path()
    assert path != g.PATH_VNNI
    has_dotprod = g.dotprod_available()
    assert path == (g.PATH_SDOT if has_dotprod else g.PATH_PAIRS)
    kernel = g.linear_s8(path)
    fresh = numba.njit(nogil=True, error_model="numpy")(kernel.py_func)  # uncached compilation
    rng = np.random.default_rng(0)
    m, k, n = 5, 40, 70
    wq = rng.integers(-127, 128, (n, k)).astype(np.int8)
    wp = g.pack_weight(wq)
    cs = g.column_sums(wp)
    zp = rng.integers(0, 256, m).astype(np.int32)
    aq = np.empty((m, wp.shape[1] * 4), np.uint8)
    aq[:, :k] = rng.integers(0, 256, (m, k))
    aq[:, k:] = zp[:, None]
    raw = np.empty((m, n), np.int32)
    f32 = np.float32
    fresh(aq, np.ones(m, f32), zp, wp, cs, np.ones(n, f32), n, np.zeros(0, f32), np.zeros((0, 0), f32), 0,
          np.zeros((0, 0), f32), raw, 0, m, 0, wp.shape[0])
    want = (aq[:, :k].astype(np.int64) - zp[:, None]) @ wq.astype(np.int64).T
    np.testing.assert_array_equal(raw, want)
    asm = "\n".join(fresh.inspect_asm().values())
    found = _dot_instructions(asm)
    if has_dotprod:
        assert "sdot" in found, found
    else:
        assert found == [], f"dot-product instructions compiled for a CPU without dotprod: {found}"
