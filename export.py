"""
export.py: merged (AdaMix-)LoRA as a PEFT LoRA adapter folder that Hugging Face `peft` (format of
peft 0.11: adapter_config.json + adapter_model.safetensors) and the servers that read it can load on
top of the released checkpoint. The one file that knows both adamix.py's names and Hugging Face's.
"""
import json
import re
from pathlib import Path

import torch

import adamix
from formats import write_safetensors
from model import Transformer

# our layer -> its Hugging Face module, per family (the inverse of model.NAME_MAPS); GPT-2's q, k, v
# are one Conv1D, c_attn, whose output columns are [q | k | v] (see model.hf_to_ours)
HF_LAYERS = {
    "bert": ("encoder.layer.{}.", {
        "attn.query": "attention.self.query", "attn.key": "attention.self.key",
        "attn.value": "attention.self.value", "attn.out": "attention.output.dense",
        "mlp.fc_in": "intermediate.dense", "mlp.fc_out": "output.dense"}),
    "gpt2": ("h.{}.", {
        "attn.query": "attn.c_attn", "attn.key": "attn.c_attn", "attn.value": "attn.c_attn",
        "attn.out": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}),
}
HF_LAYERS["roberta"] = HF_LAYERS["bert"]
HF_LAYERS["llama"] = ("model.layers.{}.", {
    "attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj", "attn.out": "self_attn.o_proj",
    "mlp.fc_gate": "mlp.gate_proj", "mlp.fc_in": "mlp.up_proj", "mlp.fc_out": "mlp.down_proj"})
# our head's layers -> (Hugging Face names, the module PEFT saves whole: modules_to_save)
HF_HEADS = {
    "bert": {"head.pooler.": ("bert.pooler.dense.", "pooler"),
             "head.classifier.": ("classifier.", "classifier")},
    "roberta": {"head.dense.": ("classifier.dense.", "classifier"),
                "head.out_proj.": ("classifier.out_proj.", "classifier")},
    "gpt2": {"head.classifier.": ("score.", "score")},
    "llama": {"head.classifier.": ("score.", "score")},
}
QKV = ("attn.query", "attn.key", "attn.value")


def export_peft(model, folder, base_model_name_or_path=None, head=None):
    """Write the merged LoRA of `model` (AdaMix-LoRA or plain LoRA, from adamix.py) and its task
    head as a PEFT LoRA adapter folder. Per layer, PEFT computes W + (lora_alpha / r) · lora_B @
    lora_A (transposed for GPT-2's Conv1D, fan_in_fan_out); we store A_bar, B_bar and
    lora_alpha = scaling · r.

    A Transformer of model.py gets Hugging Face module names (hf_module_name) and its head saved
    under the Hugging Face names. Any other nn.Module keeps its own names (PEFT can wrap it as it
    is); `head` then names its trained head module(s), saved whole (modules_to_save).

    GPT-2: LoRA on q and v is one LoRA on the fused c_attn (C -> 3C), of rank 2r:
        lora_A = [A_q; A_v]                    (2r, C)
        lora_B = [[B_q, 0], [0, 0], [0, B_v]]  (3C, 2r)
    Rows 0:C of lora_B are q's outputs, C:2C k's, 2C:3C v's, so lora_B @ lora_A =
    [B_q A_q; 0; B_v A_v], with the scalings folded into the blocks of lora_B."""
    adapters = [n for n, m in model.named_modules()
                if isinstance(m, (adamix.AdapterMixture, adamix.Adapter))]
    if adapters:  # not "unfold_lora first", which merged_lora says of folded LoRA
        raise ValueError(f"{adapters[0]}: an adapter; PEFT's LoRA format holds LoRA only "
                         "(adapters cannot be exported to it)")
    factors = adamix.merged_lora(model)
    if not factors:
        raise ValueError("the model has no LoRA mixture to export")
    family = model.config.model_type if isinstance(model, Transformer) else None
    hf_name = (lambda name: hf_module_name(model, name)) if family else (lambda name: name)
    if family is None:  # the user's own names; the head, if any, under its own name too
        head_map = {f"{h}.": (f"{h}.", h) for h in adamix.head_names(head)}
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
            b = a.new_zeros(3 * C, rank)                                           # (3C, rank)
            col, alpha = 0, float(rank)                                            # scaling 1: in b
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
    patterns = {}  # leaf name -> (rank, alpha) where it differs from (r, alpha): GPT-2's c_attn
    for hf, ra in ranks.items():
        if ra != (r, alpha):
            patterns.setdefault(hf.rsplit(".", 1)[-1], ra)
    if any(patterns.get(hf.rsplit(".", 1)[-1], ra) != ra for hf, ra in ranks.items()):
        raise ValueError(f"ranks and alphas {ranks} cannot be told apart by module name "
                         "(PEFT's rank_pattern)")
    rank_pattern = {k: ra[0] for k, ra in patterns.items()}
    alpha_pattern = {k: ra[1] for k, ra in patterns.items()}
    config = dict(
        peft_type="LORA", task_type=_task_type(model, family),
        base_model_name_or_path=base_model_name_or_path, revision=None, inference_mode=True,
        r=r, lora_alpha=alpha, lora_dropout=0.0,
        target_modules=sorted(modules),  # exact module names
        fan_in_fan_out=family == "gpt2", bias="none", modules_to_save=sorted(saved_heads) or None,
        init_lora_weights=True, layers_to_transform=None, layers_pattern=None,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=False, use_dora=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    return folder


def _task_type(model, family):
    """PEFT's task_type: None for the user's own module, else what the Hugging Face class does."""
    if family is None:
        return None
    if model.head is not None:
        return "SEQ_CLS"
    return "CAUSAL_LM" if family in ("gpt2", "llama") else "FEATURE_EXTRACTION"


def hf_module_name(model, name):
    """Our layer name -> the Hugging Face module name in the class PEFT would wrap:
    *ForSequenceClassification with a head, BertModel / RobertaModel without, GPT2LMHeadModel /
    GPT2ForSequenceClassification. E.g. BERT with a head:
        blocks.3.attn.query -> bert.encoder.layer.3.attention.self.query."""
    family = model.config.model_type
    layer, names = HF_LAYERS[family]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m is None or m.group(2) not in names:
        raise ValueError(f"{name}: no Hugging Face {family} module to export it to")
    if family == "gpt2":
        prefix = "transformer."
    elif family == "llama" or model.head is None:
        prefix = ""
    else:
        prefix = f"{family}."
    return prefix + layer.format(m.group(1)) + names[m.group(2)]
