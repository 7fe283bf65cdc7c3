"""
model.py: one Transformer for BERT, RoBERTa, GPT-2 and Llama: the frozen network that AdaMix adapts
(see adamix.py). Read top to bottom:
  1. ModelConfig: the few numbers of config.json that shape the network
  2. the network: RMSNorm, rotary, SelfAttention, MLP, Block, ClassificationHead, Transformer
  3. from_pretrained: one explicit name map per family, every shape checked, nothing left out
  4. generate: greedy and beam search with a key/value cache
The files come from formats.py (config.json, safetensors, downloads, tokenizers) and gguf.py
(llama.cpp's format); the PEFT export is export.py.

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
import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from formats import CONFIG_KEYS, config_fields, read_checkpoint, read_json, resolve_checkpoint
from gguf import gguf_file, gguf_llama_config, gguf_unpermute_qk, read_gguf


@dataclass
class ModelConfig:
    """The numbers of config.json that shape the network, in our names (formats.CONFIG_KEYS)."""
    model_type: str                   # "bert" | "roberta" | "gpt2" | "llama"
    vocab_size: int                   # V
    n_positions: int                  # learned positions (max_position_embeddings / n_positions)
    n_embd: int                       # C
    n_head: int                       # nh; hs = C // nh
    n_layer: int                      # L
    n_inner: int | None = None        # FFN width; None -> 4C (GPT2Config.n_inner)
    n_kv_head: int | None = None      # nkv, grouped-query (num_key_value_heads); None -> nh
    rope_theta: float = 10000.0       # rotary base: pair i at position p turns p / theta^(2i / hs)
    tie_word_embeddings: bool = True  # LM head = token embedding (GPT-2 always; Llama: its config)
    type_vocab_size: int = 2          # token types (BertConfig); RoBERTa 1, GPT-2 none
    activation: str = "gelu"          # BertConfig.hidden_act; GPT-2 "gelu_new" (tanh approximation)
    layer_norm_eps: float = 1e-12     # BertConfig.layer_norm_eps; GPT-2's layer_norm_epsilon 1e-5
    dropout: float = 0.1              # hidden_dropout_prob / resid_pdrop (= GPT-2's embd_pdrop)
    attn_dropout: float = 0.1         # attention_probs_dropout_prob / attn_pdrop
    classifier_dropout: float | None = None  # None -> dropout (BertForSequenceClassification)
    initializer_range: float = 0.02   # std of a fresh head layer's weights (BertConfig, GPT2Config)
    pad_token_id: int | None = 0      # RoBERTa: 1, and its positions count from pad_token_id + 1
    eos_token_id: int | None = None   # GPT-2: 50256

    def __post_init__(self):
        self.n_inner = self.n_inner or 4 * self.n_embd
        self.n_kv_head = self.n_kv_head or self.n_head

    decoder = property(lambda self: self.model_type in ("gpt2", "llama"))  # pre-LN, causal, LM head
    llama = property(lambda self: self.model_type == "llama")  # RMSNorm, rotary, SwiGLU, no biases

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, raw, path):
        """From config.json's keys (gguf_llama_config writes a GGUF's metadata in them too), each
        one checked by formats.config_fields; `path` names errors."""
        return cls(**config_fields(raw, path))

# -----------------------------------------------------------------------------
# The network. BERT and RoBERTa: post-LN blocks, x = LN(x + f(x)), bidirectional. GPT-2 and Llama:
# pre-LN blocks, x = x + f(LN(x)), causal, one more norm (ln_f) at the end.


class RMSNorm(nn.Module):
    """Llama's norm: y = w * x / sqrt(mean(x^2) + eps), no centring, no bias. In fp32 whatever the
    model's dtype (as Llama): in fp16 the squares overflow, in bf16 the mean loses digits."""

    def __init__(self, C, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., C)
        return self.weight * y.to(x.dtype)


def norm(config):
    if config.llama:
        return RMSNorm(config.n_embd, config.layer_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)


def rotary(position_ids, hs, theta, dtype):
    """cos and sin (B, 1, T, hs) of rotary position embeddings (Su et al., 2021) in the half-split
    form of Hugging Face's Llama: dimension i < hs/2 pairs with i + hs/2, and the pair turns by the
    angle position / theta^(2i / hs). In fp32: positions in the thousands need its digits."""
    i2 = torch.arange(0, hs, 2, device=position_ids.device).float()  # (hs/2,): 2i
    inv_freq = 1.0 / theta ** (i2 / hs)  # (hs/2,)
    angles = position_ids[..., None].float() * inv_freq  # (B, T) -> (B, T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hs): each pair's angle, twice
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Turn each pair (x_i, x_{i + hs/2}) of x (B, nh, T, hs) by its angle:
    (a, b) -> (a cos - b sin, b cos + a sin)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, bias = config.n_embd, not config.llama
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.dropout = config.attn_dropout
        kv_width = config.n_kv_head * (C // config.n_head)  # nkv * hs; C unless grouped-query
        # made in this order, which sets the order of the parameters and of their random draws
        self.query = nn.Linear(C, C, bias=bias)
        self.out = nn.Linear(C, C, bias=bias)
        self.key = nn.Linear(C, kv_width, bias=bias)
        self.value = nn.Linear(C, kv_width, bias=bias)

    def forward(self, x, mask, is_causal, past=None, rope=None):
        B, T, C = x.shape
        # (B, T, n*hs) -> (B, n, T, hs), n = nh for queries, nkv for keys and values
        heads = lambda t: t.view(B, T, -1, C // self.n_head).transpose(1, 2)
        q = heads(self.query(x))  # (B, nh, T, hs)
        k, v = heads(self.key(x)), heads(self.value(x))  # (B, nkv, T, hs)
        if rope is not None:  # Llama: positions enter by rotating queries and keys (cached rotated)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if past is not None:  # key/value cache: prepend the keys and values of the earlier tokens
            k = torch.cat([past[0], k], dim=2)  # (B, nkv, past + T, hs)
            v = torch.cat([past[1], v], dim=2)  # (B, nkv, past + T, hs)
        cache = (k, v)
        if self.n_kv_head != self.n_head:  # grouped-query: kv head j serves heads j*g..j*g+g-1
            g = self.n_head // self.n_kv_head
            k = k.repeat_interleave(g, dim=1)  # (B, nkv, S, hs) -> (B, nh, S, hs)
            v = v.repeat_interleave(g, dim=1)  # (B, nkv, S, hs) -> (B, nh, S, hs)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, is_causal, p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.out(y), cache


# The fastest correct attention for training, by a rule measured with `python bench.py
# --attention` (2026-12-05, 2-core AMD EPYC with AVX512-BF16, torch 2.13.0; docs/costs.md): the
# backward of torch's fused CPU kernel is slow in bf16, so written out, softmax(q k^T) v trains
# faster up to this many keys. In fp32 and in evaluation the fused kernel
# (scaled_dot_product_attention) was as fast or faster; on CUDA (not measured here) it stays.
WRITTEN_OUT_MAX_KEYS = 256


def attention_path(q, k):
    """"written out" or "fused": which computation attention() uses for these queries and keys."""
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    short = k.shape[-2] <= WRITTEN_OUT_MAX_KEYS
    cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
    return "written out" if training and short and cpu_bf16 else "fused"


def attention(q, k, v, mask, is_causal, dropout_p):
    """softmax(q k^T / sqrt(hs) + mask) v with dropout on the weights: q (B, nh, T, hs), k and v
    (B, nh, S, hs), mask boolean (True = may attend) broadcastable to (B, nh, T, S), or None."""
    if attention_path(q, k) == "fused":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=dropout_p)  # (B, nh, T, hs)
    T, S = q.shape[-2], k.shape[-2]
    if is_causal:  # query t sees keys up to t (the last T of S keys are the queries')
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
    att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, nh, T, S)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.dropout(att.softmax(-1), dropout_p)  # (B, nh, T, S)
    return att.to(v.dtype) @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)


ACTIVATIONS = {"gelu": F.gelu,  # the erf form
               "gelu_new": functools.partial(F.gelu, approximate="tanh"),  # the tanh form
               "silu": F.silu}  # x * sigmoid(x), Llama's gate


class MLP(nn.Module):
    """GELU FFN fc_out(act(fc_in(x))), or Llama's SwiGLU fc_out(silu(fc_gate(x)) * fc_in(x))
    (Shazeer, 2020); Hugging Face's gate_proj, up_proj (our fc_in) and down_proj (our fc_out)."""

    def __init__(self, config):
        super().__init__()
        C, bias = config.n_embd, not config.llama
        self.fc_gate = nn.Linear(C, config.n_inner, bias=False) if config.llama else None
        self.fc_in = nn.Linear(C, config.n_inner, bias=bias)
        self.fc_out = nn.Linear(config.n_inner, C, bias=bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x):  # (B, T, C) -> (B, T, n_inner) -> (B, T, C)
        if self.fc_gate is not None:
            return self.fc_out(self.act(self.fc_gate(x)) * self.fc_in(x))
        return self.fc_out(self.act(self.fc_in(x)))


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
        C = config.n_embd
        self.kind = "gpt2" if config.decoder else config.model_type
        p = config.dropout if config.classifier_dropout is None else config.classifier_dropout
        self.drop = nn.Dropout(p)
        if self.kind == "bert":
            self.pooler = nn.Linear(C, C)
            self.classifier = nn.Linear(C, num_labels)
        elif self.kind == "roberta":
            self.dense = nn.Linear(C, C)
            self.out_proj = nn.Linear(C, num_labels)
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
            x = hidden[torch.arange(B, device=hidden.device), last]  # (B, T, C) -> (B, C)
            return self.classifier(x)  # (B, C) -> (B, num_labels)
        x = hidden[:, 0]  # (B, T, C) -> (B, C): the first token, [CLS] or <s>
        if self.kind == "bert":  # (B, C) -> (B, num_labels)
            return self.classifier(self.drop(torch.tanh(self.pooler(x))))
        x = self.dense(self.drop(x))  # RoBERTa: (B, C) -> (B, C)
        return self.out_proj(self.drop(torch.tanh(x)))  # (B, C) -> (B, num_labels)


class Transformer(nn.Module):
    def __init__(self, config, num_labels=None):
        super().__init__()
        self.config = config
        C = config.n_embd
        post_ln = not config.decoder
        self.wte = nn.Embedding(config.vocab_size, C)  # tokens; a tied LM head reuses it
        # learned positions; Llama rotates queries and keys instead
        self.wpe = None if config.llama else nn.Embedding(config.n_positions, C)
        # token types (sentence A or B); GPT-2 and Llama have none
        self.wtt = nn.Embedding(config.type_vocab_size, C) if config.type_vocab_size else None
        self.ln_emb = nn.LayerNorm(C, eps=config.layer_norm_eps) if post_ln else nn.Identity()
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.Identity() if post_ln else norm(config)
        untied = config.llama and not config.tie_word_embeddings
        # Llama's own LM head when untied; else wte is the head
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False) if untied else None
        self.head = ClassificationHead(config, num_labels) if num_labels else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                cache=None):
        """Final hidden states (B, T, C), Hugging Face's last_hidden_state (GPT-2, Llama: after
        ln_f). attention_mask: 1 = a real token, 0 = padding; with a cache it covers the cached
        tokens too, (B, past + T). cache: a list with one entry per block, [None] * L to start;
        filled in place."""
        B, T = input_ids.shape
        past = 0 if cache is None or cache[0] is None else cache[0][0].shape[2]
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, "
                             f"expected {(B, past + T)}")
        if past + T > self.max_positions:
            raise ValueError(f"{past + T} tokens, but the model has positions for "
                             f"{self.max_positions}")
        check_ids(input_ids, self.config.vocab_size, "token ids", "vocab_size")
        if self.wtt is not None and token_type_ids is not None:
            check_ids(token_type_ids, self.config.type_vocab_size, "token types", "type_vocab_size")
        if position_ids is None:
            position_ids = self.positions(input_ids, attention_mask, past)  # (B, T)
        x = self.wte(input_ids)  # (B, T) -> (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        hs = self.config.n_embd // self.config.n_head
        rope = None  # Llama: cos, sin (B, 1, T, hs)
        if self.config.llama:
            rope = rotary(position_ids, hs, self.config.rope_theta, x.dtype)
        if self.wtt is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.wtt(types)  # (B, T) -> (B, T, C)
        x = self.drop(self.ln_emb(x))
        mask, is_causal = self.build_mask(attention_mask, B, T, past, x.device)
        for i, block in enumerate(self.blocks):
            x, kv = block(x, mask, is_causal, None if cache is None else cache[i], rope)
            if cache is not None:
                cache[i] = kv
        return self.ln_f(x)

    @property
    def max_positions(self):
        """Tokens a sequence may hold: RoBERTa's position ids start after pad_token_id (2 fewer)."""
        roberta = self.config.model_type == "roberta"
        return self.config.n_positions - (self.config.pad_token_id + 1 if roberta else 0)

    def positions(self, input_ids, attention_mask, past):
        B, T = input_ids.shape
        if self.config.model_type == "roberta":  # HF's create_position_ids_from_input_ids:
            real = (input_ids != self.config.pad_token_id).long()  # (B, T); pads keep pad_id
            return real.cumsum(1) * real + self.config.pad_token_id
        if self.config.decoder and attention_mask is not None:  # count real tokens: left padding
            counted = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, past + T)
            return counted[:, past:]  # (B, past + T) -> (B, T)
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
            raise ValueError("this model has no classification head: "
                             "load it with from_pretrained(..., num_labels=N)")
        return self.head(hidden, attention_mask)  # (B, T, C) -> (B, num_labels)

    def lm_logits(self, hidden):
        if not self.config.decoder:
            raise ValueError("lm_logits needs a decoder (gpt2, llama), "
                             f"not {self.config.model_type}")
        if self.lm_head is not None:
            return self.lm_head(hidden)  # (B, T, C) -> (B, T, V)
        return F.linear(hidden, self.wte.weight)  # (B, T, C) -> (B, T, V), tied to the embedding


def check_ids(ids, n, what, field):
    """A ValueError for ids outside 0..n-1, instead of an IndexError (CPU) or a device assert (CUDA)
    in nn.Embedding."""
    lo, hi = torch.stack(torch.aminmax(ids)).tolist() if ids.numel() else (0, 0)  # one device sync
    if not 0 <= lo <= hi < n:
        raise ValueError(f"{what} run from {lo} to {hi}, but the model's {field} is {n}")

# -----------------------------------------------------------------------------
# Loading a checkpoint: a folder (config.json and its weights) or a GGUF file, read by formats.py
# and gguf.py into Hugging Face's (or llama.cpp's) names, renamed to ours here.


def from_pretrained(name_or_path, num_labels=None, dtype=torch.float32, cache_dir=None,
                    hub_url=None):
    """Load a BERT, RoBERTa, GPT-2 or Llama checkpoint (folder, .gguf file, "minilm", "smollm2" or
    hub id), in eval mode. A GGUF file is dequantized to fp32 (then cast to dtype).

    num_labels=None keeps the checkpoint's classifier if it has one, else builds a backbone (head
    None). num_labels=N builds a head with N outputs: the checkpoint's classifier must then have N
    outputs (else ValueError); layers it lacks start fresh, N(0, initializer_range) weights and zero
    biases.
    dtype: torch.float32 / float16 / bfloat16, or "fp32" / "fp16" / "bf16"."""
    folder = resolve_checkpoint(name_or_path, cache_dir, hub_url)
    if (source := gguf_file(folder)) is not None:
        metadata, tensors = read_gguf(source)
        config = ModelConfig.from_dict(gguf_llama_config(metadata, tensors, source), source)
        tensors = gguf_unpermute_qk(tensors, config.n_head, config.n_kv_head, source)
        state = hf_to_ours(tensors, "gguf")
        config_key = (source, "llama.block_count")  # where the layer count comes from
    else:
        config = ModelConfig.from_json(folder / "config.json")
        hf_state, source = read_checkpoint(folder)
        check_float_weights(hf_state, config.model_type, source)
        state = hf_to_ours(hf_state, config.model_type)
        config_key = (folder / "config.json", CONFIG_KEYS[config.model_type]["n_layer"])
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store a copy of the embedding
    classifier = state.get("head.classifier.weight", state.get("head.out_proj.weight"))
    if classifier is not None and num_labels is not None and num_labels != classifier.shape[0]:
        raise ValueError(f"{source}: the checkpoint's classifier has {classifier.shape[0]} "
                         f"outputs, not num_labels={num_labels} (for a new head, remove the "
                         "classifier tensors from a copy)")
    num_labels = num_labels or (None if classifier is None else classifier.shape[0])
    if num_labels is None:  # a backbone: checkpoint head layers (e.g. a pooler) are not used
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    check_fits(config, state, num_labels, source, *config_key)  # before anything is allocated
    model = Transformer(config, num_labels)
    load_weights(model, state, source)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, dtype)
    return model.to(dtype).eval()


# The name maps: (pattern matched at the start of a checkpoint name, our name for that prefix).
# Before them, `bert.` / `roberta.` / `transformer.` prefixes are cut and legacy
# LayerNorm.gamma/beta renamed. None drops the tensor; a name no rule matches is unexpected.
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
        (r"h\.(\d+)\.attn\.c_attn\.", r"blocks.\1.attn.c_attn."),  # fused q, k, v: see hf_to_ours
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
        (r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq$", None),  # older files' buffer
        (r"model\.layers\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.fc_gate."),
        (r"model\.layers\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.fc_in."),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc_out."),
        (r"lm_head\.", "lm_head."),  # dropped by from_pretrained when tied
        (r"score\.", "head.classifier."),
    ],
    "gguf": [  # llama.cpp's names for a Llama (q and k rows un-permuted by gguf.gguf_unpermute_qk)
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
    name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    for pattern, ours in NAME_MAPS[family]:
        if m := re.match(pattern, name):
            return None if ours is None else m.expand(ours) + name[m.end():]
    return name


def hf_to_ours(state, family):
    """A Hugging Face state dict in our names, GPT-2's Conv1D weights made nn.Linear ones."""
    ours = {}
    for hf_name, t in state.items():
        if (name := map_name(hf_name, family)) is None:  # a tensor we do not use
            continue
        if family == "gpt2" and name.startswith("blocks.") and t.ndim == 2:
            t = t.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
        if ".attn.c_attn." in name:
            # Fused q, k, v. GPT-2 medium, C = 1024: c_attn.weight is stored (C, 3C) = (1024, 3072)
            # and is (3072, 1024) after the transpose above; rows 0:1024 are the query, 1024:2048
            # the key, 2048:3072 the value, each (1024, 1024) = nn.Linear(1024, 1024).weight. The
            # bias (3072,) splits the same way into three (1024,).
            for part, chunk in zip(("query", "key", "value"), t.chunk(3, dim=0)):
                ours[name.replace("c_attn", part)] = chunk
        else:
            ours[name] = t
    return ours


def load_weights(model, state, source):
    """Copy `state` (our names) into the model, all or nothing: every missing, unexpected or
    wrongly shaped tensor is listed in one error. Head layers with no tensor in `state` stay
    fresh."""
    params = dict(model.named_parameters())
    missing, unexpected, wrong = _misfits(params, state)
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: does not fit this {model.config.model_type} model "
                         f"(names after the name map)\n  missing: {missing}\n"
                         f"  unexpected: {unexpected}\n  wrong shape: {wrong}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def check_fits(config, state, num_labels, source, config_path, layer_key):
    """Compare the config with the checkpoint's tensor names and shapes before the network exists:
    a config.json that says vocab_size 1e9, or 100000 layers for weights of 2, is then an error in
    milliseconds, not gigabytes allocated first. The layers are counted from the names
    (blocks.{i}.); the rest is compared, as load_weights compares, with the network built on the
    meta device (shapes and no memory; no random numbers drawn). One error lists every mismatch."""
    found = sorted({int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    layers = ""
    if found != list(range(config.n_layer)):
        have = f"blocks 0..{len(found) - 1}" if found == list(range(len(found))) \
            else f"blocks {found[:8]}{'...' if len(found) > 8 else ''}"
        layers = (f"\n  layers: {layer_key} is {config.n_layer}, the checkpoint has weights for "
                  f"{len(found)} ({have})")
        config = replace(config, n_layer=min(config.n_layer, len(found)))
    with torch.device("meta"):
        skeleton = Transformer(config, num_labels)
    missing, unexpected, wrong = _misfits(dict(skeleton.named_parameters()), state)
    if layers or missing or unexpected or wrong:
        raise ValueError(f"{source}: does not fit the {config.model_type} model of {config_path} "
                         f"(names after the name map){layers}\n  missing: {missing}\n"
                         f"  unexpected: {unexpected}\n  wrong shape: {wrong}")


def check_float_weights(state, family, source):
    """Every tensor the model uses must hold floats: integer or bool bits read as weights (a header
    that says I32 over float bytes) give values like 1e9, silently. Buffers the name map drops
    (position ids, GPT-2's causal mask) may be integers."""
    bad = [f"{k!r} ({v.dtype})" for k, v in state.items()
           if not v.is_floating_point() and map_name(k, family) is not None]
    if bad:
        raise ValueError(f"{source}: tensor(s) {', '.join(bad)} are not floating point; a weight "
                         "must be F32, F16, BF16 or F64")


def _misfits(params, state):
    """(missing, unexpected, wrong shape) of `state` against {name: parameter}. Head layers with no
    tensor in `state` are fresh, not missing."""
    layer = lambda name: name.rsplit(".", 1)[0]
    fresh = {layer(k) for k in params if k.startswith("head.")} - {layer(k) for k in state}
    missing = [k for k in params if k not in state and layer(k) not in fresh]
    unexpected = [k for k in state if k not in params]
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(params[k].shape)})" for k, v in state.items()
             if k in params and v.shape != params[k].shape]
    return missing, unexpected, wrong

# -----------------------------------------------------------------------------
# Generation for GPT-2 and Llama: beam search with a key/value cache; greedy is the beam of one.


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, num_beams=1, length_penalty=1.0,
             no_repeat_ngram_size=0, eos_token_id=None, attention_mask=None, use_cache=True):
    """Continue each prompt of input_ids (B, T), left-padded with attention_mask when lengths
    differ. Returns (B, T + new), new <= max_new_tokens; a finished sequence is filled up with
    eos_token_id.

    Beam search keeps num_beams hypotheses per prompt, ranked by their summed log-probability; a
    hypothesis that emits EOS stays in the beam, frozen. The best is chosen at the end by
    score / new_tokens ** length_penalty (as HF's length_penalty). num_beams=1 is greedy decoding.
    HF keeps finished hypotheses in a separate list, so with num_beams > 1 results may differ from
    HF's when a hypothesis finishes early. The model runs as it is: call model.eval() first."""
    if not model.config.decoder:
        raise ValueError(f"generate needs a decoder (gpt2, llama), not {model.config.model_type}")
    (B, T), K = input_ids.shape, num_beams
    ids = input_ids.repeat_interleave(K, dim=0)  # (B, T) -> (B*K, T)
    mask = torch.ones_like(ids) if attention_mask is None \
        else attention_mask.repeat_interleave(K, dim=0)  # (B, T) -> (B*K, T)
    scores = torch.zeros(B, K, device=ids.device)
    scores[:, 1:] = -math.inf  # the K copies are identical: start from one, the first step branches
    done = torch.zeros(B, K, dtype=torch.bool, device=ids.device)
    lengths = torch.zeros(B, K, device=ids.device)  # new tokens up to and including EOS
    cache = [None] * len(model.blocks) if use_cache else None
    new = ids  # the tokens the cache has not seen yet
    for step in range(max_new_tokens):
        if use_cache and step == 0:  # the K copies of a prompt are identical: run each prompt once
            hidden = model(input_ids, attention_mask=attention_mask, cache=cache)
            hidden = hidden.repeat_interleave(K, dim=0)  # (B, T, C) -> (B*K, T, C), and its cache:
            cache[:] = [(k.repeat_interleave(K, dim=0), v.repeat_interleave(K, dim=0))
                        for k, v in cache]
        elif use_cache:
            hidden = model(new, attention_mask=mask, cache=cache)
        else:
            hidden = model(ids, attention_mask=mask)
        logp = F.log_softmax(model.lm_logits(hidden[:, -1]).float(), dim=-1)  # (B*K, C) -> (B*K, V)
        if no_repeat_ngram_size > 0:
            _ban_repeated_ngrams(logp, ids, mask, no_repeat_ngram_size)
        V = logp.shape[-1]
        logp = logp.view(B, K, V)  # (B*K, V) -> (B, K, V)
        if eos_token_id is not None:  # a finished hypothesis can only add another EOS, at no cost
            frozen = torch.full((V,), -math.inf, device=ids.device)
            frozen[eos_token_id] = 0.0
            logp[done] = frozen
        # (B, K*V) -> (B, K)
        scores, best = (scores[:, :, None] + logp).view(B, K * V).topk(K, dim=-1)
        beam = best // V  # (B, K): which hypothesis each survivor extends ...
        token = best % V  # (B, K): ... and with which token
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


def _ban_repeated_ngrams(logp, ids, mask, n):
    """HF's no_repeat_ngram_size: a token that would complete an n-gram already in a row's real
    tokens gets log-probability -inf. logp (rows, V), ids and mask (rows, t)."""
    for row, (seq, keep) in enumerate(zip(ids.tolist(), mask.tolist())):
        seq = [t for t, k in zip(seq, keep) if k]
        prefix = seq[len(seq) - n + 1:]  # the last n - 1 tokens
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == prefix]
        logp[row, banned] = -math.inf
