"""The edgeformer model file: one safetensors-compatible file holding weights, graph and tokenizer.

Layout (all integers little-endian)::

    offset 0        u64   N = length of the JSON header in bytes
    offset 8        N     UTF-8 JSON header, padded with trailing spaces so that 8 + N % 64 == 0
    offset 8 + N    ...   data buffer: the raw bytes of every tensor, C order, little-endian

The header is a JSON object mapping each tensor name to
``{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}`` (offsets relative to the
start of the data buffer) plus ``"__metadata__": {str: str}``.  This is exactly the
safetensors format, so ``safetensors.numpy.load_file`` / ``safe_open`` read our files.

Format decisions:

* **Alignment.**  Every tensor starts at a 64-byte-aligned *absolute* file offset.  The mmap
  base is page-aligned, so the numpy views we hand to the kernels are 64-byte aligned too
  (cache line / AVX-512 friendly).  The header is padded with spaces (valid JSON whitespace).
* **Padding tensors.**  The safetensors reader rejects holes in the data buffer ("invalid
  offset") and trailing bytes after the last tensor ("file not fully covered"); we checked
  this against safetensors 0.8.  So the gap before an aligned tensor is covered by a
  1-D ``U8`` tensor named ``__pad__.<i>`` full of zeros.  ``read_model`` validates and hides
  them; user tensor names may not start with ``__``.  The file ends at the last tensor.
* **Metadata keys we own**: ``format`` (= ``"edgeformer"``), ``edgeformer.version``
  (decimal ``FORMAT_VERSION``), ``edgeformer.graph`` (JSON text of the graph dict) and the
  optional ``edgeformer.tokenizer`` (tokenizer.json text).  Other ``edgeformer.*`` keys are
  reserved; any remaining str->str entries are user metadata.
* **BF16.**  numpy has no bfloat16, so BF16 tensors are exposed as ``uint16`` arrays holding
  the raw bit patterns (``ModelFile.dtypes[name] == "BF16"`` tells them apart from ``U16``;
  ``bf16_to_f32`` widens them).  To write BF16, pass ``BF16(bits)`` or an array whose dtype
  is named ``bfloat16`` (ml_dtypes).
* **Reading is hostile-safe.**  Everything in the header is validated before any tensor is
  touched, with Python ints (no overflow), and nothing proportional to a claimed size is
  allocated before it is checked against the real file size.  Tensors are zero-copy,
  read-only views into one ``mmap.ACCESS_READ`` mapping.  (If another process truncates the
  file while it is mapped, touching a view can still fault: that is inherent to mmap.)
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import tempfile
from typing import Any, Mapping

import numpy as np

from edgeformer.errors import ModelFileError

__all__ = [
    "ALIGNMENT",
    "BF16",
    "FORMAT_VERSION",
    "ModelFile",
    "bf16_to_f32",
    "read_model",
    "write_model",
]

FORMAT_VERSION = 1
ALIGNMENT = 64

# safetensors dtype code -> explicit little-endian numpy dtype. BF16 is exposed as raw uint16 bits.
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# numpy (kind, itemsize) -> dtype code, for the writer.
_CODES: dict[tuple[str, int], str] = {
    ("f", 8): "F64", ("f", 4): "F32", ("f", 2): "F16",
    ("i", 8): "I64", ("i", 4): "I32", ("i", 2): "I16", ("i", 1): "I8",
    ("u", 8): "U64", ("u", 4): "U32", ("u", 2): "U16", ("u", 1): "U8",
    ("b", 1): "BOOL",
}

_META = "__metadata__"
_PAD = "__pad__."
_KEY_FORMAT = "format"
_KEY_VERSION = "edgeformer.version"
_KEY_GRAPH = "edgeformer.graph"
_KEY_TOKENIZER = "edgeformer.tokenizer"
_OWNED_KEYS = (_KEY_FORMAT, _KEY_VERSION, _KEY_GRAPH, _KEY_TOKENIZER)
_MAX_NDIM = 32  # numpy 1.x limit; numpy 2 allows 64
_MAX_BYTES = (1 << 63) - 1  # numpy's size limit (intp) on 64-bit hosts


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


# --------------------------------------------------------------------------- bfloat16 helpers


class BF16:
    """Marks a uint16 array of bfloat16 bit patterns so ``write_model`` stores it as BF16."""

    __slots__ = ("bits",)

    def __init__(self, bits: np.ndarray):
        if not isinstance(bits, np.ndarray) or bits.dtype.kind != "u" or bits.dtype.itemsize != 2:
            raise TypeError("BF16() takes a uint16 numpy array of bfloat16 bit patterns")
        self.bits = bits


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen uint16 bfloat16 bit patterns (as read from a BF16 tensor) to float32 (exact)."""
    return (np.asarray(bits, dtype="<u2").astype("<u4") << 16).view("<f4")


# --------------------------------------------------------------------------- writer


def _prepare(name: Any, value: Any) -> tuple[str, np.ndarray]:
    """Validate one tensor; return (dtype code, array whose bytes are written once made LE/C)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"tensor names must be non-empty str, got {name!r}")
    if name.startswith("__"):
        raise ValueError(f"tensor name {name!r}: names starting with '__' are reserved")
    if isinstance(value, BF16):
        return "BF16", value.bits
    if not isinstance(value, np.ndarray):
        raise TypeError(f"tensor {name!r}: expected a numpy array, got {type(value).__name__}")
    if value.dtype.name == "bfloat16" and value.dtype.itemsize == 2:  # ml_dtypes / jax
        return "BF16", value.view(np.uint16)
    code = _CODES.get((value.dtype.kind, value.dtype.itemsize))
    if code is None:
        raise TypeError(f"tensor {name!r}: unsupported dtype {value.dtype}")
    return code, value


def _json_text(obj: Any, what: str) -> str:
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and read_model rejects them.
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")  # lone surrogates cannot be stored
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{what} is not serializable as JSON: {e}") from None
    return text


def write_model(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    graph: dict,
    *,
    tokenizer_json: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a model file atomically (temp file in the same directory, then ``os.replace``).

    Tensors are written one by one in mapping order (converted to little-endian, C order),
    each at a 64-byte-aligned file offset. Raises TypeError/ValueError on invalid arguments,
    before anything is written.
    """
    path = os.fspath(path)
    if not isinstance(graph, dict):
        raise TypeError(f"graph must be a dict, got {type(graph).__name__}")
    if tokenizer_json is not None and not isinstance(tokenizer_json, str):
        raise TypeError("tokenizer_json must be a str or None")
    meta: dict[str, str] = {}
    for key, val in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(val).__name__}")
        if key == _KEY_FORMAT or key.startswith("edgeformer."):
            raise ValueError(f"metadata key {key!r} is reserved by edgeformer")
        meta[key] = val
    meta[_KEY_FORMAT] = "edgeformer"
    meta[_KEY_VERSION] = str(FORMAT_VERSION)
    meta[_KEY_GRAPH] = _json_text(graph, "graph")
    if tokenizer_json is not None:
        meta[_KEY_TOKENIZER] = tokenizer_json

    # Lay out the data buffer: (array, or None for padding, begin, end) in file order.
    header: dict[str, Any] = {_META: meta}
    plan: list[tuple[np.ndarray | None, int, int]] = []
    cursor = n_pads = 0
    for name, value in tensors.items():
        code, arr = _prepare(name, value)
        begin = _align(cursor)
        if begin > cursor:  # cover the gap so safetensors sees a contiguous buffer
            pad = f"{_PAD}{n_pads}"
            n_pads += 1
            header[pad] = {"dtype": "U8", "shape": [begin - cursor], "data_offsets": [cursor, begin]}
            plan.append((None, cursor, begin))
        end = begin + arr.size * arr.dtype.itemsize
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [begin, end]}
        plan.append((arr, begin, end))
        cursor = end

    head = _json_text(header, "header").encode("utf-8")
    head += b" " * (-(8 + len(head)) % ALIGNMENT)  # data buffer starts 64-byte aligned

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for arr, begin, end in plan:
                if arr is None:
                    f.write(bytes(end - begin))
                    continue
                # One tensor at a time: at most one temporary copy (for big-endian or strided input).
                le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
                f.write(le.reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- reader


class ModelFile:
    """A parsed model file. ``tensors`` are read-only zero-copy views into one mmap.

    ``metadata`` holds the user metadata only (the keys edgeformer owns are parsed into
    ``graph``, ``tokenizer_json`` and ``version``), so ``write_model(p, m.tensors, m.graph,
    tokenizer_json=m.tokenizer_json, metadata=m.metadata)`` rewrites a file (BF16 tensors
    come back as U16 unless wrapped in ``BF16``). ``dtypes`` maps each tensor name to its
    stored dtype code ("F32", "BF16", ...).
    """

    def __init__(self, path, graph, metadata, tokenizer_json, version, tensors, dtypes, nbytes, mm):
        self.path: str = path
        self.graph: dict = graph
        self.metadata: dict[str, str] = metadata
        self.tokenizer_json: str | None = tokenizer_json
        self.version: int = version
        self.tensors: dict[str, np.ndarray] = tensors
        self.dtypes: dict[str, str] = dtypes
        self.nbytes: int = nbytes
        self._mmap = mm

    def advise_random(self, name: str) -> bool:
        """Tell the kernel that ``name`` is read at random rows (an embedding table gathered by id).

        Without it every page fault maps the surrounding 64 KiB of the file (fault-around), so a
        few hundred random rows of a 47 MB table add ~15 MB to the resident set. Returns whether the
        advice was given (not all platforms have madvise).
        """
        array = self.tensors.get(name)
        if self._mmap is None or array is None or array.nbytes == 0 or not hasattr(mmap, "MADV_RANDOM"):
            return False
        base = np.frombuffer(self._mmap, dtype=np.uint8, count=1).ctypes.data
        start = array.ctypes.data - base
        page = mmap.PAGESIZE
        begin, end = start // page * page, -(-(start + array.nbytes) // page) * page
        try:
            self._mmap.madvise(mmap.MADV_RANDOM, begin, min(end, len(self._mmap)) - begin)
        except (OSError, ValueError):
            return False
        return True

    def close(self) -> None:
        """Drop our references. Views still alive keep the mapping alive (and stay valid)."""
        self.tensors = {}
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # arrays still export the buffer: the GC unmaps it later
                pass

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelFile({self.path!r}, version={self.version}, tensors={len(self.tensors)}, nbytes={self.nbytes})"


def _strict_object(pairs: list[tuple[str, Any]]) -> dict:
    obj = {}
    for key, val in pairs:
        if key in obj:  # json.loads would silently keep the last one
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = val
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no duplicate keys. Raises ValueError or RecursionError."""
    return json.loads(text, object_pairs_hook=_strict_object, parse_constant=_reject_constant)


def _is_int(x: Any) -> bool:
    return type(x) is int  # not bool, not float


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_model(path: str | os.PathLike, *, max_header_bytes: int = 64 << 20) -> ModelFile:
    """Open, validate and map a model file. Any problem raises ModelFileError."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise ModelFileError(f"not a file path: {path!r}") from None

    def fail(msg: str) -> ModelFileError:
        return ModelFileError(f"{path}: {msg}")

    # O_NONBLOCK: opening a FIFO must not hang; it is then rejected as not a regular file.
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise fail("no such file") from None
    except (OSError, ValueError) as e:
        raise fail(f"cannot open: {e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise fail("not a regular file")
        size = st.st_size
        if size < 8:
            raise fail(f"file is {size} bytes, too short for the 8-byte header length")
        n = int.from_bytes(_read_exact(fd, 8), "little")
        if n == 0:
            raise fail("header length is 0")
        if n > max_header_bytes:
            raise fail(f"header length {n} exceeds the limit of {max_header_bytes} bytes")
        if 8 + n > size:
            raise fail(f"header length {n} runs past the end of the {size}-byte file (truncated?)")
        raw = _read_exact(fd, n)
        if len(raw) != n:
            raise fail("file shrank while reading the header")
        header, meta = _parse_header(raw, fail)
        info = _parse_meta(meta, fail)
        layout = _check_tensors(header, 8 + n, size - 8 - n, fail)
        graph = info.pop("graph")
        tensors, dtypes, mm = _map_tensors(fd, size, layout, fail)
    except OSError as e:
        raise fail(f"read error: {e}") from None
    finally:
        os.close(fd)
    return ModelFile(path, graph, info["metadata"], info["tokenizer"], info["version"],
                     tensors, dtypes, size, mm)


def _parse_header(raw: bytes, fail) -> tuple[dict, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        header = _loads(text)
    except (ValueError, RecursionError) as e:
        raise fail(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise fail(f"header must be a JSON object, got {type(header).__name__}")
    if _META not in header:
        raise fail("header has no __metadata__ (so no 'format' key): not an edgeformer model file")
    return header, header.pop(_META)


def _parse_meta(meta: Any, fail) -> dict:
    """Check the metadata; the version is checked before anything format-specific."""
    if not isinstance(meta, dict):
        raise fail("__metadata__ must be a JSON object")
    for key, val in meta.items():
        if not isinstance(val, str):
            raise fail(f"metadata value for {key!r} must be a string, got {type(val).__name__}")
    if meta.get(_KEY_FORMAT) != "edgeformer":
        raise fail(f"metadata 'format' is {meta.get(_KEY_FORMAT)!r}, expected 'edgeformer' "
                   "(is this a plain safetensors file? convert it first)")
    ver = meta.get(_KEY_VERSION)
    if ver is None:
        raise fail(f"metadata has no {_KEY_VERSION!r}")
    if not (ver.isascii() and ver.isdigit() and len(ver) <= 9) or int(ver) < 1:
        raise fail(f"bad format version {ver[:20]!r}")
    version = int(ver)
    if version > FORMAT_VERSION:
        raise fail(f"format version {version} is newer than this edgeformer supports "
                   f"({FORMAT_VERSION}): upgrade edgeformer to read it")
    for key in meta:
        if key.startswith("edgeformer.") and key not in _OWNED_KEYS:
            raise fail(f"unknown reserved metadata key {key!r}")
    text = meta.get(_KEY_GRAPH)
    if text is None:
        raise fail(f"metadata has no {_KEY_GRAPH!r}")
    try:
        graph = _loads(text)
    except (ValueError, RecursionError) as e:
        raise fail(f"{_KEY_GRAPH} is not valid JSON: {e}") from None
    if not isinstance(graph, dict):
        raise fail(f"{_KEY_GRAPH} must be a JSON object, got {type(graph).__name__}")
    user = {k: v for k, v in meta.items() if k not in _OWNED_KEYS}
    return {"graph": graph, "metadata": user, "tokenizer": meta.get(_KEY_TOKENIZER), "version": version}


def _check_tensors(header: dict, data_start: int, data_len: int, fail) -> list:
    """Validate every entry with Python ints; return [(name, code, shape, begin, end)]."""
    layout = []
    for name, entry in header.items():
        what = f"tensor {name!r}"
        is_pad = name.startswith(_PAD)
        if not name or (name.startswith("__") and not is_pad):
            raise fail(f"{what}: reserved or empty tensor name")
        if not isinstance(entry, dict):
            raise fail(f"{what}: entry must be a JSON object")
        if set(entry) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"{what}: entry must have exactly dtype, shape, data_offsets (got {sorted(entry)})")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in _DTYPES:
            raise fail(f"{what}: unsupported dtype {code!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise fail(f"{what}: shape must be a list of non-negative integers, got {shape!r}"[:300])
        if len(shape) > _MAX_NDIM:
            raise fail(f"{what}: {len(shape)} dimensions (max {_MAX_NDIM})")
        if is_pad and (code != "U8" or len(shape) != 1):
            raise fail(f"{what}: padding tensors must be 1-D U8")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise fail(f"{what}: data_offsets must be two integers, got {offsets!r}"[:300])
        begin, end = offsets
        if begin > end:
            raise fail(f"{what}: data_offsets [{begin}, {end}] are reversed")
        if not 0 <= begin <= end <= data_len:
            raise fail(f"{what}: data_offsets [{begin}, {end}] outside the {data_len}-byte data buffer")
        itemsize = _DTYPES[code].itemsize
        if math.prod(max(d, 1) for d in shape) * itemsize > _MAX_BYTES:  # numpy's own limit
            raise fail(f"{what}: shape {shape} is too large")
        nbytes = math.prod(shape) * itemsize
        if end - begin != nbytes:
            raise fail(f"{what}: shape {shape} x {code} needs {nbytes} bytes but data_offsets span {end - begin}")
        if not is_pad and (data_start + begin) % ALIGNMENT:
            raise fail(f"{what}: file offset {data_start + begin} is not {ALIGNMENT}-byte aligned")
        layout.append((name, code, shape, data_start + begin, data_start + end))
    # Overlap check: sort by position; zero-byte tensors overlap nothing.
    prev_end, prev_name = 0, None
    for name, _, _, begin, end in sorted(layout, key=lambda t: (t[3], t[4])):
        if begin == end:
            continue
        if prev_name is not None and begin < prev_end:
            raise fail(f"tensor {name!r} overlaps tensor {prev_name!r}")
        prev_end, prev_name = end, name
    return layout


def _map_tensors(fd: int, size: int, layout: list, fail):
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    if not any(end > begin for _, _, _, begin, end in layout):
        mm = None  # nothing to map (and an empty data region must not reach mmap)
    else:
        try:
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise fail(f"cannot mmap: {e}") from None
    for name, code, shape, begin, end in layout:
        if name.startswith(_PAD):
            continue
        dt = _DTYPES[code]
        if begin == end:
            arr = np.empty(shape, dtype=dt)
        else:
            arr = np.frombuffer(mm, dtype=dt, count=math.prod(shape), offset=begin).reshape(shape)
            if code == "BOOL" and arr.view(np.uint8).max() > 1:
                raise fail(f"tensor {name!r}: BOOL data holds bytes other than 0 and 1")
        arr.flags.writeable = False
        tensors[name] = arr
        dtypes[name] = code
    return tensors, dtypes, mm
