#!/usr/bin/env bash
# The runtime's tests on emulated aarch64, as a Raspberry Pi 4 (Cortex-A72: ARMv8.0, no dotprod) and
# a Raspberry Pi 5 (Cortex-A76: ARMv8.2 + dotprod), each with its own Numba cache.
#
#   tests/aarch64/run.sh [ROOTFS_DIR]      (as root; default /var/tmp/edgeformer-aarch64-rootfs)
#
# 1. builds the arm64 rootfs once (build_rootfs.sh: qemu-user-static + binfmt + mmdebstrap, only
#    numpy, numba, scipy, pytest, hypothesis inside — no torch, no onnx);
# 2. on this x86-64 host, converts all-MiniLM-L6-v2 and computes reference embeddings
#    (tests/aarch64/make_portable.py), so the emulated run checks that files converted here load and
#    run unchanged there;
# 3. runs the runtime test files under QEMU_CPU=cortex-a72 and cortex-a76. NUMBA_CPU_NAME tells LLVM
#    which CPU it compiles for (qemu 7.2 does not emulate /proc/cpuinfo, so LLVM would otherwise
#    target "generic"); qemu enforces the ISA, so a dotprod instruction in the Pi 4 run dies with SIGILL.
# Emulation is for correctness and instruction-set checks, not timing (floats run ~100x slower).
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"  # chroot, update-binfmts live in sbin
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
R="${1:-${EDGEFORMER_AARCH64_ROOTFS:-/var/tmp/edgeformer-aarch64-rootfs}}"
ART="$(mktemp -d)"
start=$(date +%s)

bash "$HERE/build_rootfs.sh" "$R"
python "$HERE/make_portable.py" "$ART"

mkdir -p "$R/src" "$R/artifacts" "$R/proc" "$R/sys" "$R/dev"
cleanup() {
  for m in "$R/artifacts" "$R/src" "$R/dev" "$R/sys" "$R/proc"; do
    mountpoint -q "$m" && umount -R "$m" 2>/dev/null || true
  done
}
trap cleanup EXIT
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 2>/dev/null || true
mount -t proc proc "$R/proc"
mount -t sysfs sys "$R/sys"
mount --rbind /dev "$R/dev"
mount --bind "$REPO" "$R/src"
mount --bind "$ART" "$R/artifacts"

# The test files of the runtime (they skip what needs torch or the converters' packages).
TESTS="tests/test_format.py tests/test_workers.py tests/test_kernels_math.py tests/test_kernels_norm.py
tests/test_kernels_embed_pool.py tests/test_attention.py tests/test_gemm_f32.py tests/test_session.py
tests/test_cache.py tests/test_lut.py tests/test_binary_hash.py tests/test_act_ir.py tests/test_sgemm.py
tests/aarch64/test_portable.py"
for ext in "$REPO"/tests/test_gemm_s8.py "$REPO"/tests/test_isa_arm.py; do [ -f "$ext" ] && TESTS="$TESTS tests/$(basename "$ext")"; done
TESTS="${EDGEFORMER_AARCH64_TESTS:-$TESTS}"  # a subset, when debugging

status=0
for cpu in cortex-a72 cortex-a76; do
  echo "=== aarch64 as $cpu ($( [ $cpu = cortex-a72 ] && echo 'Raspberry Pi 4' || echo 'Raspberry Pi 5')) ==="
  t0=$(date +%s)
  chroot "$R" env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root \
    QEMU_CPU=$cpu NUMBA_CPU_NAME=$cpu NUMBA_CACHE_DIR=/root/numba-cache-$cpu \
    HYPOTHESIS_PROFILE=emulated EDGEFORMER_PORTABLE_DIR=/artifacts PYTHONPATH=/src \
    sh -c "cd /src && python -m edgeformer.cli info && python -m pytest -q -p no:cacheprovider $(echo $TESTS)" \
    || status=$?
  echo "=== $cpu took $(( $(date +%s) - t0 )) s ==="
done
echo "aarch64 stage took $(( $(date +%s) - start )) s"
exit $status
