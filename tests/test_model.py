"""model.py against independent references: Hugging Face outputs stored in tests/fixtures (see its
README), plain torch loops and a stub language model for decoding, and a local HTTP server for loading
by hub id. The file formats, tokenizers and pip downloads are tested in test_formats.py."""
import functools
import http.server
import json
import shutil
import socket
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import formats
import model
from conftest import FIXTURES
from test_formats import write_safetensors

CHECKPOINTS = ["tiny-bert", "tiny-bert-legacy", "tiny-roberta", "tiny-gpt2", "tiny-gpt2-legacy", "tiny-llama",
               "tiny-llama-gguf"]
DECODERS = ["tiny-gpt2", "tiny-llama", "tiny-llama-gguf"]
LLAMA_ATOL = 1e-4  # the bound for the Llama fixtures (RoPE and RMSNorm add rounding; measured ~4e-6)
ATOL = 1e-5  # fp32 agreement with Hugging Face (fixtures README)
MINILM_ATOL = 1e-4  # the bound for the real checkpoint
BF16_ATOL, BF16_RTOL = 5e-2, 2e-2  # bf16 keeps 8 mantissa bits: ~0.4 % per rounding, over 2 layers
GPT2_EOS = json.loads((FIXTURES / "tiny-gpt2" / "generation_config.json").read_text())["eos_token_id"]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@functools.cache
def load(name, **kw):
    return model.from_pretrained(FIXTURES / name, **kw)


def expected(name):
    return {k: torch.from_numpy(v) for k, v in np.load(FIXTURES / name / "expected.npz").items()}


def hidden_states(m, e):
    return m(e["input_ids"], attention_mask=e["attention_mask"], token_type_ids=e.get("token_type_ids"))


def close(a, b, atol=ATOL, rtol=0.0):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def copy_fixture(name, dest):
    return Path(shutil.copytree(FIXTURES / name, dest))

# ----------------------------------------------------------------------------- outputs vs Hugging Face


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_matches_hugging_face(name):
    m, e = load(name), expected(name)
    hidden, valid = hidden_states(m, e), e["attention_mask"].bool()
    atol = LLAMA_ATOL if m.config.llama else ATOL
    close(hidden[valid], e["last_hidden_state"][valid], atol=atol)
    if m.config.decoder:
        close(m.lm_logits(hidden)[valid], e["logits"][valid], atol=atol)
    elif "logits" in e:
        close(m.classify(hidden, e["attention_mask"]), e["logits"])
    else:
        assert m.head is None  # the legacy checkpoint has no classifier: a backbone


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gpt2-legacy", "tiny-llama", "tiny-llama-gguf"])
def test_greedy_continuation(name):
    e, m = expected(name), load(name)
    new = e["greedy_output"].shape[1] - e["greedy_prompt"].shape[1]
    eos = GPT2_EOS if m.config.model_type == "gpt2" else None  # the Llama fixtures ran without stopping
    for use_cache in [True, False]:
        out = model.generate(m, e["greedy_prompt"], max_new_tokens=new, eos_token_id=eos, use_cache=use_cache)
        assert out.tolist() == e["greedy_output"].tolist()


def test_legacy_layouts_load_the_same_weights():
    for new, old in [("tiny-bert", "tiny-bert-legacy"), ("tiny-gpt2", "tiny-gpt2-legacy")]:
        a, b = dict(load(new).named_parameters()), dict(load(old).named_parameters())
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_every_family_has_the_named_linear_layers():
    for name in ["tiny-bert", "tiny-roberta", "tiny-gpt2", "tiny-llama"]:
        m = load(name)
        for i in range(m.config.n_layer):
            for layer in ["attn.query", "attn.key", "attn.value", "attn.out", "mlp.fc_in", "mlp.fc_out"]:
                assert type(m.get_submodule(f"blocks.{i}.{layer}")) is torch.nn.Linear
    assert type(m.get_submodule("blocks.0.mlp.fc_gate")) is torch.nn.Linear  # Llama's SwiGLU gate


class Shifted(torch.nn.Module):
    """What adamix.py does: a module around a Linear, called like it."""
    def __init__(self, base):
        super().__init__()
        self.base, self.calls = base, 0

    def forward(self, x):
        self.calls += 1
        return self.base(x) + 1.0


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_layers_are_called_as_modules(name):
    m, e = model.from_pretrained(FIXTURES / name), expected(name)
    before = hidden_states(m, e)
    for block in m.blocks:
        block.attn.query = Shifted(block.attn.query)
        block.mlp.fc_out = Shifted(block.mlp.fc_out)
    after = hidden_states(m, e)
    assert all(b.attn.query.calls == 1 and b.mlp.fc_out.calls == 1 for b in m.blocks)
    assert not torch.allclose(before, after)


def test_bf16_load_stays_within_bf16_tolerance():
    for name in ["tiny-bert", "tiny-gpt2"]:
        e, m = expected(name), load(name, dtype="bf16")
        assert all(p.dtype == torch.bfloat16 for p in m.parameters())
        hidden, valid = hidden_states(m, e), e["attention_mask"].bool()
        close(hidden[valid].float(), e["last_hidden_state"][valid], atol=BF16_ATOL, rtol=BF16_RTOL)
    assert next(load("tiny-roberta", dtype=torch.float16).parameters()).dtype == torch.float16


def test_sharded_checkpoint(tmp_path):
    tensors = formats.read_safetensors(FIXTURES / "tiny-bert" / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        write_safetensors(tmp_path / shard, {k: tensors[k] for k in shard_names})
    index = {"weight_map": {k: shard for shard, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(FIXTURES / "tiny-bert" / "config.json", tmp_path)
    e = expected("tiny-bert")
    close(hidden_states(model.from_pretrained(tmp_path), e), hidden_states(load("tiny-bert"), e))

# ----------------------------------------------------------------------------- task heads


def test_fresh_classifier_when_the_checkpoint_has_none():
    e = expected("tiny-gpt2")
    m = model.from_pretrained(FIXTURES / "tiny-gpt2", num_labels=3)
    w = m.head.classifier.weight
    assert w.shape == (3, 32) and m.head.classifier.bias is None and 0.01 < w.std() < 0.03
    hidden = hidden_states(m, e)
    last = e["attention_mask"].sum(1) - 1  # right padding: the last real token
    close(m.classify(hidden, e["attention_mask"]), m.head.classifier(hidden[torch.arange(3), last]))

    bert = model.from_pretrained(FIXTURES / "tiny-bert-legacy", num_labels=4)  # no pooler, no classifier
    assert bert.classify(hidden_states(bert, expected("tiny-bert-legacy")), None).shape == (3, 4)
    assert torch.all(bert.head.pooler.bias == 0) and torch.all(bert.head.classifier.bias == 0)


def test_num_labels_must_match_the_checkpoint_classifier():
    assert load("tiny-bert").head.classifier.out_features == 3  # num_labels from the checkpoint
    with pytest.raises(ValueError, match="classifier has 3 outputs, not num_labels=5"):
        model.from_pretrained(FIXTURES / "tiny-bert", num_labels=5)
    with pytest.raises(ValueError, match="no classification head"):
        load("tiny-bert-legacy").classify(torch.zeros(1, 2, 32))


def test_head_parameters_are_all_under_head():
    names = [n for n, _ in load("tiny-roberta").named_parameters() if "dense" in n or "out_proj" in n]
    assert names == ["head.dense.weight", "head.dense.bias", "head.out_proj.weight", "head.out_proj.bias"]

# ----------------------------------------------------------------------------- generation


def greedy_by_hand(m, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, m.lm_logits(m(ids))[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def beam_by_hand(m, prompt, beams, steps):
    """Textbook beam search over full recomputation: keep the `beams` best summed log-probabilities."""
    hyps = [(0.0, prompt.tolist())]
    for _ in range(steps):
        logp = torch.log_softmax(m.lm_logits(m(torch.tensor([h for _, h in hyps])))[:, -1], dim=-1)
        cands = [(s + logp[i, t].item(), h + [t]) for i, (s, h) in enumerate(hyps) for t in range(logp.shape[1])]
        hyps = sorted(cands, key=lambda c: c[0])[-beams:]
    return hyps[-1][1]


def test_beam_size_one_is_greedy():
    m, prompts = load("tiny-gpt2"), torch.randint(0, 1000, (3, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.generate(m, prompts, 10, num_beams=1), greedy_by_hand(m, prompts, 10))


def test_beam_search_matches_a_plain_beam_search():
    m, prompt = load("tiny-gpt2"), torch.tensor([5, 17, 300])
    for use_cache in [True, False]:
        out = model.generate(m, prompt[None], 4, num_beams=3, use_cache=use_cache)
        assert out[0].tolist() == beam_by_hand(m, prompt, beams=3, steps=4)


@pytest.mark.parametrize("kw", [dict(num_beams=1), dict(num_beams=4, length_penalty=0.8, no_repeat_ngram_size=2),
                                dict(num_beams=3, eos_token_id=GPT2_EOS)])
@pytest.mark.parametrize("name", DECODERS)
def test_cached_equals_uncached(kw, name):
    m, prompts = load(name), torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.generate(m, prompts, 12, **kw), model.generate(m, prompts, 12, use_cache=False, **kw))


def repeated_ngrams(seq, n):
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) - len(set(grams))


def test_no_repeat_ngram_size():
    m, prompt = load("tiny-gpt2"), expected("tiny-gpt2")["greedy_prompt"]
    assert repeated_ngrams(model.generate(m, prompt, 40, num_beams=4)[0].tolist(), 2) > 0  # the test can fail
    for beams in [1, 4]:
        out = model.generate(m, prompt, 40, num_beams=beams, no_repeat_ngram_size=2)
        assert repeated_ngrams(out[0].tolist(), 2) == 0


def test_eos_stops_and_pads_with_eos():
    m, prompt = load("tiny-gpt2"), expected("tiny-gpt2")["greedy_prompt"]
    eos = model.generate(m, prompt, 1)[0, -1].item()  # make the first greedy token the EOS
    assert model.generate(m, prompt, 10, eos_token_id=eos).tolist() == [prompt[0].tolist() + [eos]]
    out = model.generate(m, prompt.repeat(2, 1), 10, num_beams=3, eos_token_id=eos)
    assert out.shape[0] == 2


@pytest.mark.parametrize("name", DECODERS)
def test_left_padded_batch_equals_one_prompt_at_a_time(name):
    m = load(name)
    prompts = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    for kw in [dict(num_beams=1), dict(num_beams=3, no_repeat_ngram_size=3)]:
        batch = model.generate(m, ids, 8, attention_mask=mask, **kw)
        for i, p in enumerate(prompts):
            alone = model.generate(m, torch.tensor([p]), 8, **kw)
            assert batch[i, T:].tolist() == alone[0, len(p):].tolist()


class CountingLM(torch.nn.Module):
    """A stub decoder whose next-token probabilities depend only on how many A's the sequence holds:
        A's so far   P(A)   P(B)   P(EOS)     (token 0 is the prompt, never drawn)
        0            0.40   0.10   0.50
        1 or 2       0.90   0.05   0.05
        3            0.05   0.05   0.90
    Two beams end with two finished hypotheses: EOS (log 0.5 = -0.69, 1 new token) and A A A EOS
    (log 0.4 + 3 log 0.9 = -1.23, 4 new tokens). The short one has the higher sum; the long one wins
    only after length normalisation, -1.23 / 4 = -0.31 > -0.69 (length_penalty 1). Its cache holds
    the tokens so far, so generate's reordering of cache rows is exercised too."""
    A, B, EOS = 1, 2, 3
    PROBS = torch.tensor([[0.0, 0.40, 0.10, 0.50], [0.0, 0.90, 0.05, 0.05], [0.0, 0.90, 0.05, 0.05],
                          [0.0, 0.05, 0.05, 0.90]])
    config = types.SimpleNamespace(decoder=True, model_type="stub")
    blocks = [None]  # one cache entry

    def forward(self, ids, attention_mask=None, cache=None):
        if cache is not None:
            ids = ids if cache[0] is None else torch.cat([cache[0][0], ids], dim=1)
            cache[0] = (ids, ids)
        return (ids == self.A).cumsum(1)[..., None]  # (B, T) -> (B, T, 1): A's so far

    def lm_logits(self, hidden):
        return self.PROBS[hidden[..., 0].clamp(max=3)].log()  # (B, 1) -> (B, V)


def test_beam_search_normalises_finished_hypotheses_by_length():
    lm, prompt, short, long = CountingLM(), torch.tensor([[0]]), [0] + [3] * 4, [0, 1, 1, 1, 3]
    for use_cache in [True, False]:
        pick = lambda penalty: model.generate(lm, prompt, 6, num_beams=2, length_penalty=penalty,
                                              eos_token_id=lm.EOS, use_cache=use_cache)[0].tolist()
        assert pick(1.0) == long  # -1.23 / 4 beats -0.69 / 1 (a product, -1.23 * 4, would not)
        assert pick(0.0) == short  # no normalisation: the higher sum wins
        assert model.generate(lm, prompt.repeat(2, 1), 6, num_beams=2, eos_token_id=lm.EOS,
                              use_cache=use_cache).tolist() == [long, long]


def test_encoder_cannot_generate():
    with pytest.raises(ValueError, match="needs a decoder"):
        model.generate(load("tiny-bert"), torch.tensor([[1, 2]]), 3)

# ----------------------------------------------------------------------------- MiniLM (its tokenizer: test_formats.py)


def test_minilm_matches_the_reference(minilm_folder):
    e = expected("all-minilm-l6-v2-expected")
    m = model.from_pretrained("minilm")
    hidden, mask = hidden_states(m, e), e["attention_mask"]
    valid = mask.bool()
    close(hidden[valid], e["last_hidden_state"][valid], atol=MINILM_ATOL)
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, T, C) -> (B, C)
    close(torch.nn.functional.normalize(mean, dim=-1), e["mean_pooled_normalized"], atol=MINILM_ATOL)


# ----------------------------------------------------------------------------- bad input


def edited_config(tmp_path, name, **changes):
    folder = copy_fixture(name, tmp_path / name)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v != "DELETE"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_config_missing_a_field(tmp_path):
    folder = edited_config(tmp_path, "tiny-bert", hidden_size="DELETE")
    with pytest.raises(ValueError, match=r"config.json: required field\(s\) \['hidden_size'\] missing"):
        model.from_pretrained(folder)


def test_unsupported_model_type(tmp_path):
    folder = edited_config(tmp_path, "tiny-bert", model_type="t5")
    with pytest.raises(ValueError, match="config.json: model_type 't5' is not supported"):
        model.from_pretrained(folder)


def test_wrong_shape_is_listed(tmp_path):
    folder = edited_config(tmp_path, "tiny-bert", intermediate_size=40)
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    assert "model.safetensors" in str(e.value)
    assert "blocks.0.mlp.fc_in.weight (37, 32) (model: (40, 32))" in str(e.value)
    assert "blocks.1.mlp.fc_out.weight (32, 37) (model: (32, 40))" in str(e.value)


def test_missing_and_unexpected_names_are_listed(tmp_path):
    folder = copy_fixture("tiny-roberta", tmp_path / "r")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["roberta.encoder.layer.1.output.dense.weight"], state["classifier.out_proj.bias"]
    state["roberta.encoder.layer.0.adapter.weight"] = torch.zeros(2)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        model.from_pretrained(folder)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg
    assert "missing: ['blocks.1.mlp.fc_out.weight', 'head.out_proj.bias']" in msg
    assert "unexpected: ['encoder.layer.0.adapter.weight']" in msg


def test_corrupt_checkpoint_names_the_file(tmp_path):
    folder = copy_fixture("tiny-gpt2", tmp_path / "g")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{path}: tensor .* run outside"):
        model.from_pretrained(folder)


# ----------------------------------------------------------------------------- downloads


@pytest.fixture
def hub(tmp_path):
    """A local stand-in for the hub: {url}/{repo}/resolve/main/{file} served from a folder."""
    root = tmp_path / "hub"
    for repo, name in [("org/tiny-bert", "tiny-bert"), ("tiny-roberta", "tiny-roberta")]:
        shutil.copytree(FIXTURES / name, root / repo / "resolve" / "main")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hub_download(hub, tmp_path):
    cache = tmp_path / "cache"
    m = model.from_pretrained("org/tiny-bert", cache_dir=cache, hub_url=hub)
    folder = cache / "hub" / "org--tiny-bert"
    assert (folder / "model.safetensors").exists() and (folder / ".complete").exists()
    e = expected("tiny-bert")
    close(hidden_states(m, e), hidden_states(load("tiny-bert"), e))
    roberta = model.from_pretrained("tiny-roberta", cache_dir=cache, hub_url=hub)  # falls back to the .bin
    assert (cache / "hub" / "tiny-roberta" / "pytorch_model.bin").exists()
    assert roberta.head.out_proj.out_features == 2
    # once complete, the cached copy is used without the network
    assert formats.resolve_checkpoint("org/tiny-bert", cache_dir=cache, hub_url="http://127.0.0.1:9") == folder


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_hub_id_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMIX_HUB_URL", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(FileNotFoundError, match="could not download .*/bert-base-uncased/resolve/main/config.json"
                                                ".*Pass a local folder instead"):
        model.from_pretrained("bert-base-uncased", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub id"):
        formats.resolve_checkpoint("no/such/../place", cache_dir=tmp_path)

