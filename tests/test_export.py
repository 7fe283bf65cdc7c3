"""export.export_peft, checked against the PEFT LoRA format as specified.

The oracle applies the exported folder the way PEFT does, by hand and in Hugging Face names: read
adapter_config.json and adapter_model.safetensors (with the project's reader), add
(lora_alpha / r) · lora_B @ lora_A (transposed when fan_in_fan_out) to each target module's weight in
the released checkpoint, overwrite the modules_to_save, then load that checkpoint into a plain model.
Its logits must equal the merged AdaMix model's to 1e-5 (fp32).
"""
import json
import re

import pytest
import torch

import adamix
import export
import formats
import model
from conftest import FIXTURES

FAMILIES = {"tiny-bert": 3, "tiny-roberta": 2, "tiny-gpt2": None, "tiny-llama": None}  # fixture -> its classifier (None: an LM)


def apply_peft(folder, hf_state):
    """PEFT's merge, by hand from the format: W += (alpha_m / r_m) B A per target module m."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and not config["use_rslora"]
    tensors = formats.read_safetensors(folder / "adapter_model.safetensors")
    state, done = dict(hf_state), set()
    for key, t in tensors.items():
        assert key.startswith("base_model.model."), key
        name = key[len("base_model.model."):]
        if m := re.fullmatch(r"(.+)\.lora_A\.weight", name):
            module = m.group(1)
            assert module in config["target_modules"], module
            leaf = module.rsplit(".", 1)[1]
            r, alpha = config["rank_pattern"].get(leaf, config["r"]), config["alpha_pattern"].get(leaf, config["lora_alpha"])
            a, b = t, tensors[f"base_model.model.{module}.lora_B.weight"]
            assert a.shape[0] == r and b.shape[1] == r
            delta = alpha / r * b @ a                                      # (out, in)
            w = state[module + ".weight"]
            state[module + ".weight"] = w + (delta.T if config["fan_in_fan_out"] else delta)
            done.add(module)
        elif not name.endswith(".lora_B.weight"):  # a module saved whole (modules_to_save)
            assert any(name.startswith(s + ".") or f".{s}." in name for s in config["modules_to_save"]), name
            state[name] = t
    assert done == set(config["target_modules"])
    return state


def build(name, targets, experts, share):
    torch.manual_seed(0)
    net = model.from_pretrained(FIXTURES / name, num_labels=FAMILIES[name])
    router = adamix.add_adamix(net, targets, "lora", adamix.AdaMixConfig(num_experts=experts, r=3, share=share,
                                                                          lora_alpha=5.0), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained-looking experts and head: B is zero at init
        for n, p in net.named_parameters():
            if "adamix_" in n or n.startswith("head."):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return net.eval(), router


def logits(net, ids):
    hidden = net(ids)
    return net.classify(hidden) if net.head is not None else net.lm_logits(hidden)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("targets, experts, share", [
    (["*.attn.query", "*.attn.value"], 4, "up"),    # AdaMix-LoRA as in the paper: q, v, B shared
    (["*.attn.query", "*.attn.key", "*.attn.value", "*.mlp.fc_out"], 3, "none"),
    (["*.attn.value", "*.mlp.fc_in"], 1, "none"),   # plain LoRA (one expert)
])
def test_exported_peft_adapter_applied_to_the_checkpoint_gives_the_merged_logits(tmp_path, name, targets, experts, share):
    net, _ = build(name, targets, experts, share)
    folder = export.export_peft(net, tmp_path / "adapter", base_model_name_or_path="tiny")
    hf_state, _ = formats.read_checkpoint(FIXTURES / name)
    config = model.ModelConfig.from_json(FIXTURES / name / "config.json")
    plain = model.Transformer(config, FAMILIES[name])
    model.load_weights(plain, model.hf_to_ours(apply_peft(folder, hf_state), config.model_type), folder)
    ids = torch.randint(3, config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged, served = logits(net, ids), logits(plain.eval(), ids)
        torch.testing.assert_close(served, merged, atol=1e-5, rtol=0)
        adamix.collapse_experts(net)  # the merged weights really are non-trivial: the base model differs
        base = model.from_pretrained(FIXTURES / name, num_labels=FAMILIES[name])
        if FAMILIES[name]:
            base.head.load_state_dict(net.head.state_dict())
        assert not torch.allclose(logits(base, ids), merged, atol=1e-3)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "tiny"
    assert saved["task_type"] == ("SEQ_CLS" if FAMILIES[name] else "CAUSAL_LM")
    assert saved["fan_in_fan_out"] == (name == "tiny-gpt2")


def test_gpt2_q_and_v_become_one_lora_of_twice_the_rank_on_c_attn(tmp_path):
    net, _ = build("tiny-gpt2", ["*.attn.query", "*.attn.value"], 4, "up")
    folder = export.export_peft(net, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert config["r"] == 6
    tensors = formats.read_safetensors(folder / "adapter_model.safetensors")
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    C = net.config.n_embd
    assert b.shape == (3 * C, 6) and torch.equal(b[C:2 * C], torch.zeros(C, 6))  # k: no update
    assert torch.equal(b[:C, 3:], torch.zeros(C, 3)) and torch.equal(b[2 * C:, :3], torch.zeros(C, 3))


def test_export_refuses_adapters_and_folded_lora(tmp_path):
    net = model.from_pretrained(FIXTURES / "tiny-bert")
    adamix.add_adamix(net, ["*.mlp.fc_out"], "adapter")
    with pytest.raises(ValueError, match="LoRA"):
        export.export_peft(net, tmp_path / "a")
    net, _ = build("tiny-bert", ["*.attn.query"], 2, "up")
    adamix.fold_lora(net)
    with pytest.raises(ValueError, match="unfold_lora"):
        export.export_peft(net, tmp_path / "b")
