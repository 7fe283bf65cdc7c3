"""
gguf.py: llama.cpp's GGUF file, read by hand (no `gguf` package): a Llama's config, weights and
tokenizer, returned as a plain dict, fp32 tensors under GGUF's names, and a tokenizers.Tokenizer.
model.py's from_pretrained builds its ModelConfig and Transformer from them.

A GGUF file (version 2 or 3, little-endian) is, in order:
  magic b"GGUF" | u32 version | u64 tensor count | u64 metadata count
  metadata:     string key | u32 value type | value            (strings: u64 length + UTF-8 bytes)
  tensor infos: string name | u32 n_dims | u64 dims[n_dims] | u32 tensor type | u64 offset
  padding to `general.alignment` (32 by default), then the data; every offset counts from there.
dims lists the contiguous dimension first (ne0): a torch (out, in) weight is stored as dims
[in, out].

Read top to bottom: read_gguf; dequantize_gguf (F32, F16, BF16, Q8_0, Q4_1, vectorised over blocks);
gguf_llama_config (the `llama.*` metadata in config.json's keys); gguf_unpermute_qk (llama.cpp's row
order for query and key weights, undone); gguf_tokenizer (byte-level BPE from `tokenizer.ggml.*`);
gguf_file (is this checkpoint a GGUF?); the byte reader. Every defect of a file is a ValueError
naming the file, and the tensor or key where there is one.
"""
import math
import struct
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)   # version 1 (2023) counted with u32; llama.cpp writes 3 since late 2023
GGUF_ALIGNMENT = 32      # default of general.alignment
# metadata value types: struct format of the scalar ones; 8 string, 9 array
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
# tensor types this reader knows: ggml type id -> (name, elements per block, bytes per block)
GGUF_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
              8: ("Q8_0", 32, 34),   # f16 scale d, 32 int8 q: x = d * q
              3: ("Q4_1", 32, 20)}   # f16 scale d, f16 minimum m, 16 bytes of 4-bit q: x = d*q + m
GGUF_TOKEN_CONTROL = 3       # tokenizer.ggml.token_type of a special token ...
GGUF_TOKEN_USER_DEFINED = 4  # ... and of another


def read_gguf(path, with_tensors=True):
    """(metadata {key: value}, tensors {GGUF name: fp32 tensor}) of a GGUF file. with_tensors=False
    checks the same and returns shape-only tensors (device "meta") without dequantizing anything."""
    raw = memoryview(Path(path).read_bytes())
    f = _GGUFBytes(raw, path)
    if (magic := bytes(f.take(4, "the magic number"))) != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    if (version := f.scalar("I", "the version")) not in GGUF_VERSIONS:
        raise ValueError(f"{path}: GGUF version {version} is not supported (only {GGUF_VERSIONS})")
    n_tensors = f.scalar("Q", "the tensor count")
    n_meta = f.scalar("Q", "the metadata count")
    metadata = {}
    for i in range(n_meta):
        key = f.string(f"metadata key {i}")
        metadata[key] = f.value(f.scalar("I", f"the type of metadata {key!r}"), f"metadata {key!r}")
    infos = {}
    for i in range(n_tensors):
        name = f.string(f"the name of tensor {i}")
        where = f"tensor {name!r}"
        n_dims = f.scalar("I", where)
        if n_dims > 4 or name in infos:
            problem = "a second tensor of that name" if name in infos \
                else f"{n_dims} dimensions (at most 4)"
            raise ValueError(f"{path}: {where}: {problem}")
        dims = [f.scalar("Q", where) for _ in range(n_dims)]
        infos[name] = (dims, f.scalar("I", where), f.scalar("Q", where))  # dims, type, offset
    alignment = metadata.get("general.alignment", GGUF_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"{path}: general.alignment {alignment!r} is not a positive integer")
    start = -(-f.pos // alignment) * alignment  # the data begins at the next multiple of alignment
    data = raw[start:]
    layout = {}  # name -> (kind, offset, bytes, torch shape), every field checked
    for name, (dims, ttype, offset) in infos.items():
        where = f"{path}: tensor {name!r}"
        if ttype not in GGUF_TYPES:
            raise ValueError(f"{where}: unknown tensor type {ttype} (this reader knows "
                             f"{', '.join(kind for kind, _, _ in GGUF_TYPES.values())})")
        kind, block, block_bytes = GGUF_TYPES[ttype]
        if dims and dims[0] % block:
            raise ValueError(f"{where}: rows of {dims[0]} elements are not whole {kind} blocks "
                             f"of {block}")
        nbytes = math.prod(dims) // block * block_bytes
        if offset % alignment or offset + nbytes > len(data):
            raise ValueError(f"{where}: its {nbytes} bytes at offset {offset} lie outside the "
                             f"{len(data)}-byte data region or off its {alignment}-byte alignment "
                             "(truncated?)")
        shape = tuple(reversed(dims))  # GGUF lists the contiguous dimension first, torch last
        layout[name] = (kind, offset, nbytes, shape)
    # a crafted file can point two tensors at the same bytes: each needs bytes of its own
    spans = sorted((offset, offset + n, name) for name, (_, offset, n, _) in layout.items() if n)
    for (a_begin, a_end, a), (b_begin, b_end, b) in zip(spans, spans[1:]):
        if b_begin < a_end:
            raise ValueError(f"{path}: tensors {a!r} and {b!r} overlap: bytes [{a_begin}, "
                             f"{a_end}) and [{b_begin}, {b_end}) of the data region")
    tensors = {}
    for name, (kind, offset, nbytes, shape) in layout.items():
        if with_tensors:
            tensors[name] = dequantize_gguf(data[offset:offset + nbytes], kind).reshape(shape)
        else:
            tensors[name] = torch.empty(shape, device="meta")
    return metadata, tensors


def dequantize_gguf(buf, kind):
    """fp32 values of one tensor's bytes, all blocks at once. The block layouts (ggml-common.h):
        Q8_0, 34 bytes per 32 values: f16 d | int8 q[32]                  x_i = d * q_i
        Q4_1, 20 bytes per 32 values: f16 d | f16 m | u8 qs[16]           x_i = d * q_i + m
              q_i = qs[i] & 0xF for i < 16 (low nibbles), qs[i - 16] >> 4 for i >= 16 (high
              nibbles)"""
    if len(buf) == 0:
        return torch.empty(0)
    b = torch.frombuffer(bytearray(buf), dtype=torch.uint8)  # a copy: aligned and writable
    if kind in ("F32", "F16", "BF16"):
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]
        return b.view(dtype).float()
    f16 = lambda cols: cols.contiguous().view(torch.float16).float()  # (nb, 2) bytes -> (nb, 1)
    if kind == "Q8_0":
        blocks = b.view(-1, 34)  # (nb, 34)
        q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (nb, 32)
        return (f16(blocks[:, :2]) * q).flatten()  # (nb*32,)
    blocks = b.view(-1, 20)  # Q4_1: (nb, 20)
    qs = blocks[:, 4:]  # (nb, 16)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # (nb, 32): 0-15 low nibbles, 16-31 high
    return (f16(blocks[:, :2]) * q + f16(blocks[:, 2:4])).flatten()  # (nb*32,)


def _gguf_get(metadata, key, path, default=None):
    if key not in metadata and default is None:
        raise ValueError(f"{path}: metadata {key!r} is missing")
    return metadata.get(key, default)


def _gguf_count(metadata, key, path, default=None):
    """A value that counts something (heads, layers, widths): a positive integer, else an error
    naming the key, before anything divides by it."""
    value = _gguf_get(metadata, key, path, default)
    if type(value) is not int or value < 1:
        raise ValueError(f"{path}: metadata {key!r} is {_short(value)}, expected a positive "
                         "integer")
    return value


def _gguf_strings(metadata, key, path, default=None):
    """An array of strings (tokens, merges), else an error naming the key."""
    value = _gguf_get(metadata, key, path, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        found = f"an array holding {_short(next(v for v in value if not isinstance(v, str)))}" \
            if isinstance(value, list) else _short(value)
        raise ValueError(f"{path}: metadata {key!r} must be an array of strings, found {found}")
    return value


def _gguf_token_id(metadata, key, n_tokens, path):
    """A token id (bos, eos) that has a token: an integer in [0, n_tokens), else an error naming
    the key."""
    value = metadata[key]
    if type(value) is not int or not 0 <= value < n_tokens:
        raise ValueError(f"{path}: metadata {key!r} is {_short(value)}, not the id of one of the "
                         f"{n_tokens} tokens")
    return value


def _short(value):
    """A metadata value in an error message: its repr, cut; lists by their length."""
    if isinstance(value, list):
        return f"an array of {len(value)} values"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:40] + '...'}"


def gguf_llama_config(metadata, tensors, path):
    """The `llama.*` metadata as a Hugging Face config.json dict (formats.config_fields reads it).
    Tied embeddings when the file has no `output.weight`, as llama.cpp does. What would change the
    math and this reader does not implement (RoPE scaling, experts, sliding windows, partial rotary)
    is an error."""
    if (arch := metadata.get("general.architecture")) != "llama":
        raise ValueError(f"{path}: general.architecture {arch!r} is not supported (only 'llama')")
    scaling = metadata.get("llama.rope.scaling.type", "none") != "none"
    experts = metadata.get("llama.expert_count", 0)
    if scaling or experts or "llama.attention.sliding_window" in metadata:
        raise ValueError(f"{path}: RoPE scaling, experts or sliding-window attention are not "
                         "supported")
    n_embd = _gguf_count(metadata, "llama.embedding_length", path)
    n_head = _gguf_count(metadata, "llama.attention.head_count", path)
    n_kv_head = _gguf_count(metadata, "llama.attention.head_count_kv", path, n_head)
    if n_embd % n_head:
        raise ValueError(f"{path}: metadata 'llama.attention.head_count' {n_head} does not divide "
                         f"'llama.embedding_length' {n_embd} into heads")
    if n_head % n_kv_head:
        raise ValueError(f"{path}: metadata 'llama.attention.head_count_kv' {n_kv_head} does not "
                         f"divide 'llama.attention.head_count' {n_head}: query heads cannot share "
                         "key/value heads evenly")
    if metadata.get("llama.rope.dimension_count", n_embd // n_head) != n_embd // n_head:
        raise ValueError(f"{path}: llama.rope.dimension_count "
                         f"{metadata['llama.rope.dimension_count']} is not the head size "
                         f"{n_embd // n_head} (partial rotary is not supported)")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab_size = _gguf_count(metadata, "llama.vocab_size", path,
                             tensors["token_embd.weight"].shape[0])
    eos = "tokenizer.ggml.eos_token_id"
    return {"model_type": "llama", "hidden_size": n_embd, "num_attention_heads": n_head,
            "vocab_size": vocab_size,
            "max_position_embeddings": _gguf_count(metadata, "llama.context_length", path),
            "num_hidden_layers": _gguf_count(metadata, "llama.block_count", path),
            "intermediate_size": _gguf_count(metadata, "llama.feed_forward_length", path),
            "num_key_value_heads": n_kv_head,
            "rms_norm_eps": _gguf_get(metadata, "llama.attention.layer_norm_rms_epsilon", path),
            "rope_theta": metadata.get("llama.rope.freq_base", 10000.0),
            "tie_word_embeddings": "output.weight" not in tensors,
            "eos_token_id": _gguf_token_id(metadata, eos, vocab_size, path)
            if eos in metadata else None}


def gguf_unpermute_qk(tensors, n_head, n_kv_head, path):
    """Undo llama.cpp's row order of the query and key weights. Its RoPE turns adjacent pairs
    (x_2i, x_2i+1); Hugging Face's (ours) turns (x_i, x_{i + hs/2}). Converting to GGUF reorders
    every head's rows as reshape(n, 2, hs/2, C).swapaxes(1, 2); the inverse, per head, is
        w.reshape(n, hs/2, 2, C).transpose(1, 2).reshape(n * hs, C)
    e.g. SmolLM2's key weight (192, 576), n = 3 heads of hs = 64:
        (3, 32, 2, 576) -> (3, 2, 32, 576) -> (192, 576)."""
    out = dict(tensors)
    for name, w in tensors.items():
        if name.endswith("attn_q.weight"):
            n = n_head
        elif name.endswith("attn_k.weight"):
            n = n_kv_head
        else:
            continue
        rows = w.shape[0]
        if w.ndim != 2 or rows % n or rows // n % 2:
            raise ValueError(f"{path}: tensor {name!r} of shape {tuple(w.shape)} does not split "
                             f"into {n} heads of an even size (metadata: {n} heads)")
        out[name] = w.reshape(n, rows // n // 2, 2, -1).transpose(1, 2).reshape(rows, -1)
    return out


def gguf_tokenizer(metadata, path):
    """The byte-level BPE of `tokenizer.ggml.*` (model "gpt2": tokens in id order, "a b" merges in
    rank order) as a tokenizers.Tokenizer, as transformers builds it from a GGUF: GPT-2's byte-level
    pre-tokenizer without a prefix space; control and user-defined tokens (ChatML's <|im_start|>,
    <|im_end|>) are special, matched whole in the text; BOS only if tokenizer.ggml.add_bos_token
    says so."""
    if (kind := metadata.get("tokenizer.ggml.model")) != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported "
                         "(only 'gpt2', byte-level BPE)")
    tokens = _gguf_strings(metadata, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ")) for m in _gguf_strings(metadata, "tokenizer.ggml.merges", path,
                                                          [])]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: tokenizer.ggml.merges holds an entry that is not two tokens "
                         "'a b'")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type", [])
    tok.add_special_tokens([t for t, k in zip(tokens, types)
                            if k in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED)])
    if metadata.get("tokenizer.ggml.add_bos_token") and "tokenizer.ggml.bos_token_id" in metadata:
        bos = tokens[_gguf_token_id(metadata, "tokenizer.ggml.bos_token_id", len(tokens), path)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokens.index(bos))])
    return tok


def gguf_file(path):
    """The .gguf file that `path` is, or that a folder without config.json holds alone; else
    None."""
    path = Path(path)
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf")) if not (path / "config.json").exists() else []
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ValueError(f"{path}: several .gguf files ({names}); pass one of them")
    return files[0] if files else None

# -----------------------------------------------------------------------------
# The byte reader


class _GGUFBytes:
    """A cursor over the file's bytes; reading past the end is an error that says what was being
    read."""

    def __init__(self, raw, path):
        self.raw = raw
        self.path = path
        self.pos = 0

    def take(self, n, what):
        if n > len(self.raw) - self.pos:
            raise ValueError(f"{self.path}: truncated: {what} runs past the end of the file "
                             f"({len(self.raw)} bytes)")
        self.pos += n
        return self.raw[self.pos - n:self.pos]

    def scalar(self, fmt, what):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what):
        try:
            return bytes(self.take(self.scalar("Q", what), what)).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype, what):
        if vtype in GGUF_SCALARS:
            return self.scalar(GGUF_SCALARS[vtype], what)
        if vtype == GGUF_STRING:
            return self.string(what)
        if vtype == GGUF_ARRAY:
            etype, n = self.scalar("I", what), self.scalar("Q", what)
            if etype in GGUF_SCALARS:  # numbers in one go: token types are 49,152 of them
                fmt = GGUF_SCALARS[etype]
                raw = self.take(n * struct.calcsize(fmt), what)
                return np.frombuffer(raw, dtype="<" + fmt).tolist()
            if etype == GGUF_STRING:
                return [self.string(what) for _ in range(n)]
            raise ValueError(f"{self.path}: {what} is an array of unknown value type {etype}")
        raise ValueError(f"{self.path}: {what} has unknown value type {vtype}")
