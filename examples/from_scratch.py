"""
A model you wrote yourself, taken through AdaMix: load pretrained weights, add AdaMix-LoRA, train with
the consistency loss, save the small file, load it back, merge, leave AdaMix behind (unwrap), and
export a PEFT LoRA adapter. About ten seconds on a laptop CPU:

    python examples/from_scratch.py

The task is made up so the script needs no download: does token 7 occur in a sequence of 12 tokens?
"""
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # adamix.py, export.py, formats.py
import adamix  # noqa: E402
import export  # noqa: E402 (export_peft)
import formats  # noqa: E402 (read_safetensors)

VOCAB, T, C, CLASSES = 20, 12, 32, 2


class TinyEncoder(nn.Module):
    """One attention layer and an FFN, written from scratch; named nn.Linear layers for AdaMix."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, C)
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.ffn = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * C, C))
        self.norm = nn.LayerNorm(C)
        self.head = nn.Linear(C, CLASSES)

    def forward(self, ids):                                              # ids (B, T)
        x = self.embed(ids)                                              # (B, T, C)
        x = x + F.scaled_dot_product_attention(self.query(x), self.key(x), self.value(x))
        x = self.norm(x + self.ffn(x))
        return self.head(x.mean(1))                                      # (B, C) -> (B, CLASSES)


def batch(n, g):
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    return ids, (ids == 7).any(1).long()


def main(out_dir, steps=150, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    out_dir = Path(out_dir)
    pretrained = TinyEncoder().state_dict()  # stands in for your released checkpoint
    targets = ["query", "value"]
    config = adamix.AdaMixConfig(num_experts=4, r=4, lora_alpha=8.0, share="up")

    # 1. the order: pretrained weights first, then add_adamix (it wraps the layers as they are)
    net = TinyEncoder()
    net.load_state_dict(pretrained)
    router = adamix.add_adamix(net, targets, "lora", config, seed=seed)
    adamix.mark_only_adamix_trainable(net, head="head")  # the experts and the head; the rest frozen
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)

    # 2. train: two passes, each call of a mixture draws its own route, and the consistency loss
    net.train()
    for step in range(steps):
        ids, y = batch(64, g)
        logits_a, logits_b = net(ids), net(ids)
        loss = F.cross_entropy(logits_a, y) + adamix.consistency_loss(logits_a, logits_b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # experts not routed keep grad None: AdamW leaves them alone
    ids, y = batch(512, g)
    net.eval()  # merged experts
    with torch.no_grad():
        merged = net(ids)
    accuracy = (merged.argmax(1) == y).float().mean().item()
    print(f"trained {steps} steps: loss {loss.item():.3f}, accuracy (merged experts) {accuracy:.3f}")

    # 3. save the small file: experts, head, router state
    torch.save(adamix.adamix_state_dict(net, head="head"), out_dir / "adamix.pt")

    # 4. load: pretrained weights, the same add_adamix call, then the small file
    fresh = TinyEncoder()
    fresh.load_state_dict(pretrained)
    adamix.add_adamix(fresh, targets, "lora", config, seed=seed)
    adamix.load_adamix_state_dict(fresh, torch.load(out_dir / "adamix.pt", weights_only=True), head="head")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids), merged)
    print(f"saved and loaded {out_dir / 'adamix.pt'}: same logits")

    # 5. merge and leave AdaMix behind: plain nn.Linear layers with (alpha/r) B_bar A_bar folded in
    plain = adamix.unwrap(copy.deepcopy(fresh))
    assert not adamix.mixtures(plain) and all(isinstance(getattr(plain, t), nn.Linear) for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), merged, rtol=1e-5, atol=1e-5)
    print("unwrapped into a plain TinyEncoder: same logits")

    # 6. export a PEFT LoRA adapter (your module names; the head saved whole) and apply it by hand
    folder = export.export_peft(fresh, out_dir / "peft", head="head")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = formats.read_safetensors(folder / "adapter_model.safetensors")
    served = TinyEncoder()
    state = dict(pretrained)
    for t in cfg["target_modules"]:
        a, b = (tensors[f"base_model.model.{t}.lora_{s}.weight"] for s in "AB")
        state[f"{t}.weight"] = state[f"{t}.weight"] + cfg["lora_alpha"] / cfg["r"] * b @ a
    state.update({k[len("base_model.model."):]: v for k, v in tensors.items() if ".lora_" not in k})
    served.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(served.eval()(ids), merged, rtol=1e-5, atol=1e-5)
    print(f"exported {folder} (targets {cfg['target_modules']}, r {cfg['r']}): applied by hand, same logits")
    return accuracy


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(sys.argv[1] if len(sys.argv) > 1 else tmp)
