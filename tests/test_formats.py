"""formats.read_safetensors: round trips through an independent writer, clear errors, and fuzzing."""
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import formats

ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def encode_safetensors(tensors, header_extra=None):
    """The format as its specification writes it: u64 header length, JSON header, raw bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    for name, fields in (header_extra or {}).items():
        header[name].update(fields)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write_safetensors(path, tensors, header_extra=None):
    Path(path).write_bytes(encode_safetensors(tensors, header_extra))
    return Path(path)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 5, generator=g), "h": torch.randn(4, generator=g).half(),
            "b": torch.randn(2, 2, generator=g).bfloat16(), "i": torch.arange(6).view(2, 3),
            "scalar": torch.tensor(1.5, dtype=torch.float64), "empty": torch.zeros(0, 3), "m": torch.tensor([True, False])}


def test_round_trip_every_dtype_and_shape(tmp_path):
    tensors = sample_tensors()
    got = formats.read_safetensors(write_safetensors(tmp_path / "a.safetensors", tensors))
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


@pytest.mark.parametrize("cut, message", [(4, "truncated, 4 bytes"), (30, "header length"), (-8, "run outside")])
def test_truncated_file(tmp_path, cut, message):
    data = encode_safetensors(sample_tensors())
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=message) as e:
        formats.read_safetensors(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("fields, message", [
    ({"data_offsets": [0, 10**6]}, r"tensor 'w': data_offsets \[0, 1000000\] run outside"),
    ({"data_offsets": [8, 4]}, "run outside"),
    ({"dtype": "F8_E9"}, "tensor 'w': unknown dtype 'F8_E9'"),
    ({"dtype": ["F32"]}, "unknown dtype"),
    ({"shape": [3, 6]}, r"hold 60 bytes, but F32 \[3, 6\] needs 72"),
    ({"shape": [3, -5]}, "not a list of non-negative integers"),
    ({"shape": [3, True]}, "not a list of non-negative integers"),
])
def test_bad_header_fields(tmp_path, fields, message):
    path = write_safetensors(tmp_path / "bad.safetensors", sample_tensors(), {"w": fields})
    with pytest.raises(ValueError, match=message) as e:
        formats.read_safetensors(path)
    assert str(path) in str(e.value)


def test_header_not_json(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        formats.read_safetensors(path)


def read_or_value_error(data):
    """Parsing `data` returns tensors or raises a ValueError naming the file; nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.safetensors"
        path.write_bytes(data)
        try:
            tensors = formats.read_safetensors(path)
        except ValueError as e:
            assert str(path) in str(e)
            return None
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    return tensors


@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    read_or_value_error(data)


@given(st.binary(max_size=64))
def test_fuzz_random_header(text):
    read_or_value_error(struct.pack("<Q", len(text)) + text + bytes(32))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=8)


@given(field=st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), value=json_values,
       name=st.sampled_from(list(sample_tensors())))
def test_fuzz_mutated_header_field(field, value, name):
    read_or_value_error(encode_safetensors(sample_tensors(), {name: {field: value}}))


@given(length=st.integers(0, 2**64 - 1) | st.integers(0, 600), cut=st.integers(0, 600),
       flips=st.lists(st.tuples(st.integers(0, 599), st.integers(0, 255)), max_size=4))
def test_fuzz_mutated_bytes(length, cut, flips):
    data = bytearray(encode_safetensors(sample_tensors()))
    for i, byte in flips:
        data[i % len(data)] = byte
    data[:8] = struct.pack("<Q", length) if length % 3 == 0 else data[:8]  # sometimes a wrong header length
    read_or_value_error(bytes(data[:cut] if cut < len(data) else data))
