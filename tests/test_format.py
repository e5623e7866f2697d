"""Model file writer/reader: round trips, alignment, zero-copy, safetensors compatibility, hostile files."""

import json
import mmap
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeformer.errors import ModelFileError
from edgeformer.format import ALIGNMENT, BF16, FORMAT_VERSION, ModelFile, bf16_to_f32, read_model, write_model

GRAPH = {"nodes": [{"op": "matmul", "inputs": ["x", "w"]}], "dim": 4, "eps": 1e-5, "name": "tiny ✓"}

NUMPY_DTYPES = ["<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "i1", "<u8", "<u4", "<u2", "u1", "?"]


# --------------------------------------------------------------------------- helpers


def parse_header(path):
    """Independent header parser (no edgeformer code): returns (header dict, data start)."""
    blob = open(path, "rb").read()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), 8 + n


def raw_file(path, header, data=b"", header_len=None, pad=True):
    """Write a hand-made file: u64 length, JSON header (space padded), data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        text += b" " * (-(8 + len(text)) % ALIGNMENT)
    n = len(text) if header_len is None else header_len
    path.write_bytes(n.to_bytes(8, "little") + text + data)
    return path


def good_meta(**over):
    meta = {"format": "edgeformer", "edgeformer.version": "1", "edgeformer.graph": json.dumps(GRAPH)}
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def expected_bytes(arr):
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def assert_mmap_view(arr):
    """The array is a read-only view whose base chain ends in an mmap (zero-copy)."""
    assert not arr.flags.writeable
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    assert isinstance(base, mmap.mmap), type(base)


# --------------------------------------------------------------------------- round trips

arrays = st.sampled_from(NUMPY_DTYPES + [">f4", ">i8", ">u2", ">f2"]).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8).filter(lambda s: not s.startswith("__"))


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.dictionaries(names, arrays, max_size=6), transpose=st.booleans())
def test_round_trip_hypothesis(tmp_path, tensors, transpose):
    if transpose:  # non-contiguous inputs must be written C-contiguous
        tensors = {k: v.T for k, v in tensors.items()}
    path = tmp_path / "m.edge"
    write_model(path, tensors, GRAPH, metadata={"author": "me"})
    header, data_start = parse_header(path)
    assert (data_start % ALIGNMENT) == 0
    with read_model(path) as m:
        assert set(m.tensors) == set(tensors)
        assert m.graph == GRAPH and m.metadata == {"author": "me"} and m.version == FORMAT_VERSION
        assert m.tokenizer_json is None and m.nbytes == os.path.getsize(path)
        for name, arr in tensors.items():
            got = m.tensors[name]
            assert got.shape == arr.shape
            assert got.dtype == arr.dtype.newbyteorder("<")
            assert got.tobytes() == expected_bytes(arr)
            assert not got.flags.writeable
            begin = header[name]["data_offsets"][0]
            assert (data_start + begin) % ALIGNMENT == 0
            if got.size:
                assert got.ctypes.data % ALIGNMENT == 0
                assert_mmap_view(got)


def test_round_trip_every_dtype_and_edge_shapes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {}
    for dt in NUMPY_DTYPES:
        for shape in [(), (0,), (3, 0, 2), (1,), (5, 7), (2, 3, 5)]:
            a = rng.integers(0, 100, size=shape).astype(dt)
            tensors[f"{dt}{shape}"] = a
    tensors["big_endian"] = np.arange(12, dtype=">f8").reshape(3, 4)
    tensors["strided"] = np.arange(40, dtype=np.int32)[::3]
    path = tmp_path / "m.edge"
    write_model(path, tensors, GRAPH, tokenizer_json='{"model": {}}')
    m = read_model(path)
    assert m.tokenizer_json == '{"model": {}}' and m.metadata == {}
    for name, arr in tensors.items():
        assert m.tensors[name].shape == arr.shape
        np.testing.assert_array_equal(m.tensors[name], arr)
    m.close()


def test_bf16(tmp_path):
    x = np.array([1.0, -2.5, 3.140625, 0.0], dtype=np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    path = tmp_path / "m.edge"
    write_model(path, {"b": BF16(bits), "u": bits}, GRAPH)
    m = read_model(path)
    assert m.dtypes == {"b": "BF16", "u": "U16"}
    assert m.tensors["b"].dtype == np.uint16
    np.testing.assert_array_equal(bf16_to_f32(m.tensors["b"]), x)


def test_empty_model_and_empty_data_region(tmp_path):
    path = tmp_path / "m.edge"
    write_model(path, {}, {})
    m = read_model(path)
    assert m.tensors == {} and m.graph == {}
    m.close()
    write_model(path, {"e": np.zeros((0, 4), np.float32), "f": np.zeros(0, np.int8)}, GRAPH)
    header, data_start = parse_header(path)
    assert os.path.getsize(path) == data_start  # zero-length data region
    m = read_model(path)
    assert m.tensors["e"].shape == (0, 4) and not m.tensors["e"].flags.writeable


def test_read_only_zero_copy_and_close(tmp_path):
    path = tmp_path / "m.edge"
    write_model(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, GRAPH)
    m = read_model(path)
    w = m.tensors["w"]
    assert_mmap_view(w)
    with pytest.raises(ValueError):
        w[0, 0] = 1.0
    with pytest.raises(ValueError):
        w.flags.writeable = True
    m.close()  # must not crash while w is alive
    m.close()
    assert m.tensors == {}
    np.testing.assert_array_equal(w, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_padding_tensors_hidden(tmp_path):
    path = tmp_path / "m.edge"
    write_model(path, {"a": np.ones(3, np.float32), "b": np.ones(5, np.int8)}, GRAPH)
    header, _ = parse_header(path)
    pads = [k for k in header if k.startswith("__pad__.")]
    assert pads and all(header[k]["dtype"] == "U8" for k in pads)
    assert set(read_model(path).tensors) == {"a", "b"}


# --------------------------------------------------------------------------- safetensors


def test_safetensors_reads_our_files(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    rng = np.random.default_rng(1)
    tensors = {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "h": rng.standard_normal(7).astype(np.float16),
        "q": rng.integers(-128, 127, (4, 3), dtype=np.int8),
        "s": np.array(2.5, dtype=np.float64),
        "e": np.zeros((0, 3), np.float32),
        "m": np.array([True, False, True]),
        "be": np.arange(5, dtype=">i4"),
    }
    path = tmp_path / "m.edge"
    write_model(path, tensors, GRAPH, tokenizer_json="{}", metadata={"k": "v"})
    loaded = safetensors_numpy.load_file(str(path))
    assert {k for k in loaded if not k.startswith("__pad__.")} == set(tensors)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(loaded[name], arr)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "edgeformer" and json.loads(meta["edgeformer.graph"]) == GRAPH
    assert meta["k"] == "v" and meta["edgeformer.tokenizer"] == "{}"


def test_safetensors_reads_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    t = torch.tensor([1.0, -3.5, 0.15625], dtype=torch.bfloat16)
    path = tmp_path / "m.edge"
    write_model(path, {"b": BF16(t.view(torch.int16).numpy().view(np.uint16))}, GRAPH)
    assert torch.equal(st_torch.load_file(str(path))["b"], t)


def test_plain_safetensors_file_rejected(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "plain.safetensors"
    safetensors_numpy.save_file({"a": np.ones(3, np.float32)}, str(path))
    with pytest.raises(ModelFileError, match="not an edgeformer model file"):
        read_model(path)


# --------------------------------------------------------------------------- writer validation


@pytest.mark.parametrize(
    "tensors, exc",
    [
        ({"": np.ones(1)}, TypeError),
        ({1: np.ones(1)}, TypeError),
        ({"__x": np.ones(1)}, ValueError),
        ({"__pad__.0": np.ones(1)}, ValueError),
        ({"a": [1.0]}, TypeError),
        ({"a": np.ones(1, np.complex64)}, TypeError),
        ({"a": np.array(["x"])}, TypeError),
        ({"a": np.array([None])}, TypeError),
    ],
)
def test_write_rejects_bad_tensors(tmp_path, tensors, exc):
    with pytest.raises(exc):
        write_model(tmp_path / "m.edge", tensors, GRAPH)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"graph": [1]}, TypeError),
        ({"graph": {"x": float("nan")}}, ValueError),
        ({"graph": {"x": object()}}, ValueError),
        ({"metadata": {"a": 1}}, TypeError),
        ({"metadata": {"format": "x"}}, ValueError),
        ({"metadata": {"edgeformer.graph": "{}"}}, ValueError),
        ({"tokenizer_json": {"a": 1}}, TypeError),
    ],
)
def test_write_rejects_bad_args(tmp_path, kwargs, exc):
    path = tmp_path / "m.edge"
    write_model(path, {"a": np.ones(2, np.float32)}, GRAPH)
    before = path.read_bytes()
    kwargs = {"graph": GRAPH, **kwargs}
    with pytest.raises(exc):
        write_model(path, {"a": np.zeros(2, np.float32)}, **kwargs)
    assert path.read_bytes() == before  # atomic: the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.edge"]


# --------------------------------------------------------------------------- hostile files


def small_file(tmp_path):
    path = tmp_path / "good.edge"
    write_model(path, {"a": np.arange(3, dtype=np.float32), "b": np.arange(4, dtype=np.int16).reshape(2, 2)}, GRAPH)
    return path


def test_truncated_at_every_position(tmp_path):
    blob = small_file(tmp_path).read_bytes()
    cut_path = tmp_path / "cut.edge"
    for cut in range(len(blob)):
        cut_path.write_bytes(blob[:cut])
        with pytest.raises(ModelFileError):
            read_model(cut_path)


def test_not_a_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        read_model(tmp_path / "missing.edge")
    with pytest.raises(ModelFileError, match="regular"):
        read_model(tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(ModelFileError, match="regular"):
            read_model(tmp_path / "fifo")


def test_header_length_checks(tmp_path):
    p = tmp_path / "h.edge"
    for n, match in [(0, "is 0"), (2**63, "exceeds"), (2**64 - 1, "exceeds"), (10_000, "past the end")]:
        raw_file(p, {"__metadata__": good_meta()}, header_len=n)
        with pytest.raises(ModelFileError, match=match):
            read_model(p)
    raw_file(p, {"__metadata__": good_meta()})
    with pytest.raises(ModelFileError, match="exceeds"):
        read_model(p, max_header_bytes=16)


F4 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

HOSTILE_HEADERS = {
    "not utf8": b"\xff\xfe{}",
    "not json": b"{not json",
    "json array": b"[1, 2, 3]",
    "json string": b'"hello"',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "huge int": b'{"a": ' + b"9" * 5000 + b"}",
    "nan constant": b'{"__metadata__": {}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, NaN]}}',
    "duplicate key": b'{"a": 1, "a": 2}',
    "no metadata": {"a": F4},
    "metadata not object": {"__metadata__": ["x"]},
    "metadata non-str value": {"__metadata__": {**good_meta(), "x": 1}},
    "wrong format": {"__metadata__": good_meta(format="gguf")},
    "missing version": {"__metadata__": good_meta(**{"edgeformer.version": None})},
    "version 999": {"__metadata__": good_meta(**{"edgeformer.version": "999"})},
    "version 0": {"__metadata__": good_meta(**{"edgeformer.version": "0"})},
    "version garbage": {"__metadata__": good_meta(**{"edgeformer.version": "1.0"})},
    "version huge": {"__metadata__": good_meta(**{"edgeformer.version": "9" * 10000})},
    "unknown reserved key": {"__metadata__": good_meta(**{"edgeformer.secret": "x"})},
    "missing graph": {"__metadata__": good_meta(**{"edgeformer.graph": None})},
    "graph not json": {"__metadata__": good_meta(**{"edgeformer.graph": "{oops"})},
    "graph is list": {"__metadata__": good_meta(**{"edgeformer.graph": "[1]"})},
    "graph NaN": {"__metadata__": good_meta(**{"edgeformer.graph": '{"a": NaN}'})},
    "entry not object": {"__metadata__": good_meta(), "a": [1]},
    "entry extra key": {"__metadata__": good_meta(), "a": {**F4, "x": 1}},
    "entry missing key": {"__metadata__": good_meta(), "a": {"dtype": "F32", "shape": [2]}},
    "bad dtype": {"__metadata__": good_meta(), "a": {**F4, "dtype": "F8_E4M3"}},
    "dtype not str": {"__metadata__": good_meta(), "a": {**F4, "dtype": ["F32"]}},
    "object dtype": {"__metadata__": good_meta(), "a": {**F4, "dtype": "O"}},
    "negative dim": {"__metadata__": good_meta(), "a": {**F4, "shape": [-2]}},
    "float dim": {"__metadata__": good_meta(), "a": {**F4, "shape": [2.0]}},
    "bool dim": {"__metadata__": good_meta(), "a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}},
    "shape not list": {"__metadata__": good_meta(), "a": {**F4, "shape": 2}},
    "huge shape": {"__metadata__": good_meta(), "a": {**F4, "shape": [2**40, 2**40]}},
    "huge shape zero": {"__metadata__": good_meta(), "a": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}},
    "huge shape overflow": {"__metadata__": good_meta(), "a": {**F4, "shape": [2**64 + 2]}},
    "too many dims": {"__metadata__": good_meta(), "a": {"dtype": "U8", "shape": [1] * 40, "data_offsets": [0, 1]}},
    "wrong byte count": {"__metadata__": good_meta(), "a": {**F4, "data_offsets": [0, 12]}},
    "offsets reversed": {"__metadata__": good_meta(), "a": {"dtype": "U8", "shape": [0], "data_offsets": [8, 0]}},
    "negative offset": {"__metadata__": good_meta(), "a": {**F4, "data_offsets": [-64, -56]}},
    "offset out of bounds": {"__metadata__": good_meta(), "a": {**F4, "data_offsets": [64, 72]}},
    "offset huge": {"__metadata__": good_meta(), "a": {**F4, "data_offsets": [2**64, 2**64 + 8]}},
    "offset float": {"__metadata__": good_meta(), "a": {**F4, "data_offsets": [0.0, 8.0]}},
    "offset string": {"__metadata__": good_meta(), "a": {**F4, "data_offsets": ["0", "8"]}},
    "offset null": {"__metadata__": good_meta(), "a": {**F4, "data_offsets": None}},
    "offset three": {"__metadata__": good_meta(), "a": {**F4, "data_offsets": [0, 8, 16]}},
    "misaligned": {"__metadata__": good_meta(), "a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}},
    "overlap": {
        "__metadata__": good_meta(),
        "a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
        "b": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
    },
    "overlap via pad": {
        "__metadata__": good_meta(),
        "a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
        "__pad__.0": {"dtype": "U8", "shape": [8], "data_offsets": [8, 16]},
    },
    "bad pad tensor": {"__metadata__": good_meta(), "__pad__.0": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
    "reserved name": {"__metadata__": good_meta(), "__evil__": F4},
    "empty name": {"__metadata__": good_meta(), "": F4},
    "bool bytes": {"__metadata__": good_meta(), "m": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}},
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_headers(tmp_path, case):
    data = bytes([7]) * 64  # BOOL tensors see byte 7, which is not 0/1
    p = raw_file(tmp_path / "bad.edge", HOSTILE_HEADERS[case], data)
    with pytest.raises(ModelFileError) as info:
        read_model(p)
    assert str(p) in str(info.value)
    if case == "version 999":
        assert "upgrade edgeformer" in str(info.value)


def test_hand_made_valid_file_is_accepted(tmp_path):
    """Sanity check for the hostile suite: the same helper builds a file that reads fine."""
    header = {"__metadata__": good_meta(), "a": F4, "z": {"dtype": "I8", "shape": [0, 2**40], "data_offsets": [64, 64]}}
    p = raw_file(tmp_path / "ok.edge", header, np.array([1.5, 2.5], "<f4").tobytes() + bytes(56))
    m = read_model(p)
    np.testing.assert_array_equal(m.tensors["a"], [1.5, 2.5])
    assert m.tensors["z"].shape == (0, 2**40)


def test_misaligned_header_padding(tmp_path):
    """Offsets are checked as absolute file offsets: an unaligned data buffer start is rejected."""
    text = json.dumps({"__metadata__": good_meta(), "a": F4}).encode()
    text += b" " * ((8 - (8 + len(text))) % ALIGNMENT)  # data buffer starts at 8 mod 64
    p = raw_file(tmp_path / "bad.edge", text, bytes(8), pad=False)
    with pytest.raises(ModelFileError, match="aligned"):
        read_model(p)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_byte_flips(tmp_path, data):
    blob = bytearray(small_file(tmp_path).read_bytes())
    n = int.from_bytes(blob[:8], "little")
    header_end = 8 + n
    flips = data.draw(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1, max_size=4))
    for pos, val in flips:
        blob[pos] = val
    p = tmp_path / "flipped.edge"
    p.write_bytes(bytes(blob))
    try:
        m = read_model(p)
    except ModelFileError:
        return
    assert isinstance(m, ModelFile)
    for arr in m.tensors.values():
        arr.tobytes()  # every view is inside the mapping
