"""examples/from_scratch.py runs end to end: it learns, and its own checks (same logits after save and
load, after unwrap, and from the PEFT adapter applied by hand) hold."""
import importlib.util

from conftest import ROOT


def test_from_scratch_example_trains_saves_loads_merges_and_exports(tmp_path):
    spec = importlib.util.spec_from_file_location("from_scratch", ROOT / "examples" / "from_scratch.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    accuracy = example.main(tmp_path, steps=100)
    assert accuracy > 0.8  # chance is about 0.5: token 7 is in 1 - (19/20)^12 = 46 % of the sequences
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def test_readme_own_model_snippet_runs_verbatim(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use AdaMix in your own model"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(__import__("tempfile"), "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert not (tmp_path / "adamix.pt").exists()  # nothing left in the working directory
    saved = __import__("torch").load(next((tmp_path / "tmp").glob("*/adamix.pt")))  # mkdtemp()
    assert any(k.startswith("3.") for k in saved) and any("adamix_" in k for k in saved)


def test_adamix_py_works_copied_alone_and_imports_only_torch(tmp_path):
    import ast
    import os
    import shutil
    import subprocess
    import sys
    source = (ROOT / "adamix.py").read_text()
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert imported <= {"torch", *sys.stdlib_module_names}, imported
    shutil.copy(ROOT / "adamix.py", tmp_path / "adamix.py")
    script = (
        "import torch, torch.nn as nn, adamix\n"
        "net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))\n"
        "router = adamix.add_adamix(net, ['0'], 'lora', adamix.AdaMixConfig(num_experts=2, r=2))\n"
        "adamix.mark_only_adamix_trainable(net, head='2')\n"
        "net(torch.randn(3, 4)).sum().backward()\n"
        "net.eval(); y = net(torch.ones(1, 4)); adamix.unwrap(net)\n"
        "assert type(net[0]) is nn.Linear and torch.allclose(net(torch.ones(1, 4)), y)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
