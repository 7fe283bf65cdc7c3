"""The direction of the imports between the top-level files (issue 21), read from their source:
adamix.py (torch only) and the format files (formats.py, gguf.py) at the bottom; model.py on the
format files; data.py on formats.py for its downloads; export.py, train.py and bench.py on top."""
import ast
import sys

import pytest
from conftest import ROOT

OURS = {path.stem for path in ROOT.glob("*.py")}


def imports(name):
    """The top-level modules a file imports, anywhere in it."""
    tree = ast.parse((ROOT / name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_adamix_imports_only_torch_and_the_standard_library():
    assert imports("adamix.py") <= {"torch", *sys.stdlib_module_names}


@pytest.mark.parametrize("name", ["formats.py", "gguf.py"])
def test_format_files_build_no_model(name):
    assert imports(name) & OURS <= {"gguf"}  # formats.py reads GGUF files through gguf.py


def test_model_never_imports_the_method_nor_file_machinery():
    machinery = {"subprocess", "pickle", "urllib", "zipfile", "struct"}
    assert imports("model.py") & (OURS | machinery) == {"formats", "gguf"}


def test_data_downloads_through_formats_not_model():
    assert imports("data.py") & OURS == {"formats"}


def test_only_the_top_files_know_both_the_method_and_the_network():
    both = {path.name for path in ROOT.glob("*.py") if {"adamix", "model"} <= imports(path.name)}
    assert both <= {"export.py", "train.py", "bench.py"}
