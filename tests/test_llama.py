"""The Llama family of model.py against plain-torch oracles (complex rotation for RoPE, repeated heads for
grouped-query attention, fp32 math for RMSNorm) and its config checks. The fixture comparisons (both
layouts, greedy tokens, cache) are in test_model.py; the GGUF reader in test_gguf.py."""
import json
import shutil

import pytest
import torch

import adamix
import formats
import model
from conftest import FIXTURES
from test_formats import write_safetensors


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def llama_folder(tmp_path, **changes):
    folder = tmp_path / "llama"
    shutil.copytree(FIXTURES / "tiny-llama", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v != "DELETE"}))
    return folder


def test_rotary_is_a_complex_rotation():
    """Pair (x_i, x_{i + hs/2}) as the complex number x_i + j x_{i + hs/2}: RoPE multiplies it by
    exp(j p / theta^(2i / hs)) at position p."""
    B, nh, T, hs, theta = 2, 3, 5, 8, 500.0
    x, pos = torch.randn(B, nh, T, hs, dtype=torch.float64), torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    cos, sin = model.rotary(pos, hs, theta, torch.float64)
    z = torch.complex(x[..., :hs // 2], x[..., hs // 2:])  # (B, nh, T, hs/2)
    angle = pos[:, None, :, None] / theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (B, 1, T, hs/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(model.apply_rotary(x, cos, sin), torch.cat([z.real, z.imag], dim=-1), atol=1e-6, rtol=0)


def test_grouped_query_attention_equals_repeated_heads():
    """nkv key/value heads shared by groups of query heads = nh heads whose key/value weights repeat."""
    config = model.ModelConfig("llama", vocab_size=50, n_positions=32, n_embd=48, n_head=6, n_layer=1, n_inner=40,
                               n_kv_head=2, layer_norm_eps=1e-6, activation="silu", dropout=0.0, attn_dropout=0.0,
                               type_vocab_size=0, tie_word_embeddings=False)
    gqa = model.Transformer(config).eval()
    full = model.Transformer(model.ModelConfig(**{**config.__dict__, "n_kv_head": 6})).eval()
    state = gqa.state_dict()
    for name in ["blocks.0.attn.key.weight", "blocks.0.attn.value.weight"]:  # (nkv*hs, C) -> (nh*hs, C)
        state[name] = state[name].view(2, 8, 48).repeat_interleave(3, dim=0).reshape(48, 48)
    full.load_state_dict(state)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gqa(ids), full(ids), atol=1e-5, rtol=0)
    assert gqa.blocks[0].attn.key.weight.shape == (16, 48) and gqa.lm_head is not None


def test_rms_norm_is_computed_in_fp32():
    norm, x = model.RMSNorm(64, eps=1e-6), (torch.randn(3, 64) * 300).to(torch.bfloat16)
    norm.weight.normal_()
    x32 = x.float()
    by_hand = (x32 / torch.sqrt((x32 ** 2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * norm.weight
    assert torch.equal(norm(x), by_hand)
    fp16 = (torch.ones(2, 64) * 400).half()  # 400^2 overflows fp16: the fp32 computation does not
    assert torch.isfinite(norm.half()(fp16)).all()


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope type 'linear'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope type 'dynamic'"),
    (dict(sliding_window=64), "sliding_window=64 is not supported"),
    (dict(attention_bias=True), "attention_bias=True is not supported"),
    (dict(mlp_bias=True), "mlp_bias=True is not supported"),
    (dict(head_dim=32), "head_dim=32 is not supported"),
    (dict(hidden_act="gelu_pytorch_tanh"), "activation 'gelu_pytorch_tanh' is not supported"),
    (dict(num_key_value_heads=3), "4 query heads cannot share 3 key/value heads"),
])
def test_unsupported_config_fields_are_errors(tmp_path, change, message):
    with pytest.raises(ValueError, match=f"config.json: .*{message}"):
        model.from_pretrained(llama_folder(tmp_path, **change))


def test_older_config_with_rope_theta_at_the_top(tmp_path):
    """transformers < 5 writes rope_theta beside the other fields, and rope_scaling null."""
    folder = llama_folder(tmp_path, rope_parameters="DELETE", rope_theta=10000.0, rope_scaling=None)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model.from_pretrained(folder)(ids), model.from_pretrained(FIXTURES / "tiny-llama")(ids))
    other = model.from_pretrained(llama_folder(tmp_path / "b", rope_parameters={"rope_theta": 99.0}))
    assert other.config.rope_theta == 99.0 and not torch.allclose(other(ids), model.from_pretrained(folder)(ids))


def test_sharded_llama_checkpoint(tmp_path):
    tensors = formats.read_safetensors(FIXTURES / "tiny-llama" / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        write_safetensors(tmp_path / shard, {k: tensors[k] for k in shard_names})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: shard for shard, ks in shards.items() for k in ks}}))
    shutil.copy(FIXTURES / "tiny-llama" / "config.json", tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    a, b = model.from_pretrained(tmp_path), model.from_pretrained(FIXTURES / "tiny-llama")
    assert torch.equal(a.lm_logits(a(ids)), b.lm_logits(b(ids)))


def test_tied_and_untied_heads():
    untied, tied = model.from_pretrained(FIXTURES / "tiny-llama"), model.from_pretrained(FIXTURES / "tiny-llama-gguf")
    assert untied.lm_head.weight.shape == (1000, 64) and not torch.equal(untied.lm_head.weight, untied.wte.weight)
    assert tied.lm_head is None and "lm_head.weight" not in dict(tied.named_parameters())
    h = tied(torch.tensor([[3, 4]]))
    assert torch.equal(tied.lm_logits(h), h @ tied.wte.weight.T)


def test_adamix_wraps_the_llama_layers_by_name():
    m = model.from_pretrained(FIXTURES / "tiny-llama")
    ids = torch.tensor([[3, 4, 5, 6]])
    before = m.lm_logits(m(ids))
    cfg = adamix.AdaMixConfig(num_experts=3, r=4, zero_up=True)
    adamix.add_adamix(m, ["*.attn.query", "*.attn.value"], "lora", cfg, seed=0)
    adamix.add_adamix(m, ["*.mlp.fc_out"], "adapter", cfg, seed=0)
    adamix.mark_only_adamix_trainable(m, head=None)  # a language model: no task head
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(adamix.PREFIX in n for n in trainable)
    assert len([n for n in trainable if ".attn.value." in n]) > 0 and len([n for n in trainable if ".mlp." in n]) > 0
    m.eval()
    # LoRA's B and (zero_up) the adapter's up projection start at zero: the adapted model starts as the original
    torch.testing.assert_close(m.lm_logits(m(ids)), before, atol=1e-5, rtol=0)
