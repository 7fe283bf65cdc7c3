"""
model.py: one Transformer for BERT, RoBERTa and GPT-2, and its own loading of released checkpoints.

Read top to bottom: where files come from (a cache filled by pip or urllib), ...
"""
import hashlib
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

# -----------------------------------------------------------------------------
# Where files come from: one cache folder, filled by `pip download` or by urllib.

CACHE_DIR = Path(os.environ.get("ADAMIX_CACHE", Path.home() / ".cache" / "adamix"))


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(requirement, sha256, cache_dir=None, sdist=False, find_links=None):
    """Fetch one PyPI file (a wheel, or with sdist=True a source archive) into the cache.

    Uses `python -m pip download --no-deps`, so nothing is installed and the package's own
    dependencies are never pulled. A cached file whose sha256 matches is reused; a file whose
    hash differs is an error (never silently used). `find_links` points pip at a local folder
    instead of PyPI (offline copies, tests)."""
    name, _, version = requirement.partition("==")
    dest = Path(cache_dir or CACHE_DIR) / "pip"
    norm = lambda s: s.lower().replace("-", "_")  # wheels and sdists spell names differently
    stem = norm(f"{name}-{version}")

    def cached():
        return [p for p in dest.glob("*") if norm(p.name).startswith(stem)
                and p.name.endswith(".tar.gz" if sdist else ".whl")]

    if not cached():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        if find_links is not None:
            cmd += ["--no-index", "--find-links", str(find_links)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not cached():
            raise FileNotFoundError(
                f"could not fetch {requirement} with `{' '.join(cmd[1:])}`:\n{done.stderr.strip()[-800:]}\n"
                f"Offline? Put the file in {dest} yourself, or pass a local folder instead.")
    path = cached()[0]
    got = sha256_of(path)
    if got != sha256:
        raise ValueError(f"{path}: sha256 {got} does not match the expected {sha256}; delete the file and retry")
    return path


def download_url(url, dest, sha256=None):
    """Download `url` to `dest` atomically (a .part file renamed at the end): never half a file."""
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
    except OSError as e:  # URLError and HTTPError are OSErrors
        part.unlink(missing_ok=True)
        raise FileNotFoundError(f"could not download {url}: {e}. Offline? Pass a local folder instead.") from e
    if sha256 is not None and sha256_of(part) != sha256:
        part.unlink()
        raise ValueError(f"{url}: sha256 does not match the expected {sha256}")
    os.replace(part, dest)
    return dest
