"""The README's quick start, for real: `python train.py` on all-MiniLM-L6-v2 and movie reviews.
Slow (about 7 minutes on 2 CPU cores): skipped by default, run by hand with `python -m pytest -m slow`."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_python_train_py_learns_movie_review_polarity(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "--out_dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=15 * 60)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["method"] == "adamix-adapter" and metrics["config"]["task"] == "mr"
    assert metrics["test"]["merged"]["accuracy"] > 0.70  # chance: 0.5 (the test split is about balanced)
    assert set(metrics["test"]) == {"merged", "greedy", "best-expert", "random", "expert:0", "ensemble"}
