"""Files crafted by someone hostile (issue 24): archives whose build backend would run code, GGUF
and safetensors headers that lie, config.json files that would allocate gigabytes, data files with
impossible values or endless lines. Each is refused with a message that names the file and the key,
tensor or line; nothing runs, nothing huge is allocated, nothing bad stays in the cache."""
import io
import tarfile
import zipfile

import pytest

import data
import formats
import model
from test_data import server  # noqa: F401  (a fixture: a local http.server)
from test_formats import fake_wheel
from test_gguf import f32_copy

# ----------------------------------------------------------------------------- archives (item 7)

EVIL_BACKEND = """\
from pathlib import Path
Path({marker!r}).write_text("the archive's own code ran")
"""


def tar_gz(members):
    """A .tar.gz in memory holding {name: bytes}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def crafted_sdist(folder, marker):
    """A `vaderSentiment-3.3.2.tar.gz` with the movie reviews where read_mr looks for them, and an
    in-tree build backend in its pyproject.toml that writes `marker` the moment it is imported: pip
    imports it to prepare the sdist's metadata (`pip download`, even with --no-deps)."""
    folder.mkdir(exist_ok=True)
    top = "vaderSentiment-3.3.2/"
    reviews = tar_gz({data.MR_FILE: b"1\t2.3\tA charming film .\r\n6000\t-1.8\tdull"})
    path = folder / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(tar_gz({
        top + "PKG-INFO": b"Metadata-Version: 2.1\nName: vaderSentiment\nVersion: 3.3.2\n",
        top + "pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "evil"\n'
                                b'backend-path = ["."]\n',
        top + "evil.py": EVIL_BACKEND.format(marker=str(marker)).encode(),
        data.MR_ARCHIVE: reviews}))
    return path


def test_crafted_sdist_in_data_dir_is_refused_before_anything_opens_it(tmp_path):
    marker = tmp_path / "ran"
    sdist = crafted_sdist(tmp_path / "data_dir", marker)
    got = formats.sha256_of(sdist)
    with pytest.raises(ValueError, match=f"{sdist}: refused, its sha256 {got} is not the expected "
                                         f"{data.MR_SDIST[1]} of vaderSentiment==3.3.2"):
        data.load_mr(cache_dir=tmp_path / "cache", find_links=tmp_path / "data_dir")
    assert not marker.exists()                                  # its code never ran
    assert list((tmp_path / "cache" / "pip").iterdir()) == []  # and nothing of it is in the cache


def test_sdist_in_data_dir_with_the_pinned_hash_is_copied_not_built(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    sdist = crafted_sdist(tmp_path / "data_dir", marker)
    monkeypatch.setattr(data, "MR_SDIST", ("vaderSentiment==3.3.2", formats.sha256_of(sdist)))
    texts = data.load_mr(cache_dir=tmp_path / "cache", find_links=tmp_path / "data_dir")
    assert sorted(e.label for split in texts.values() for e in split) == [0, 1]
    cached = tmp_path / "cache" / "pip" / sdist.name
    assert cached.read_bytes() == sdist.read_bytes() and not marker.exists()
    assert [p.name for p in cached.parent.iterdir()] == [sdist.name]  # no temporary file left


def test_sdist_from_the_index_is_fetched_by_url_and_checked(tmp_path, server,  # noqa: F811
                                                             monkeypatch):
    www, url = server
    marker = tmp_path / "ran"
    folder = www / "packages" / "source" / "v" / "vaderSentiment"
    folder.mkdir(parents=True)
    crafted_sdist(folder, marker)
    monkeypatch.setenv("ADAMIX_PYPI_URL", url)
    with pytest.raises(ValueError, match=f"{url}/packages/source/v/vaderSentiment/"
                                         "vaderSentiment-3.3.2.tar.gz: sha256 does not match"):
        data.load_mr(cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "pip").iterdir()) == [] and not marker.exists()


def test_wheel_from_the_index_with_a_wrong_hash_is_not_kept(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "index")
    monkeypatch.setenv("PIP_NO_INDEX", "1")                  # pip's own index: a local folder
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    with pytest.raises(ValueError, match=f"fakepkg==0.1.0: the wheel pip fetched, {wheel.name}, "
                                         f"has sha256 {formats.sha256_of(wheel)}, not the expected "
                                         f"{'00' * 32}: not kept"):
        formats.pip_download("fakepkg==0.1.0", "00" * 32, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "pip").iterdir()) == []
    got = formats.pip_download("fakepkg==0.1.0", formats.sha256_of(wheel),
                               cache_dir=tmp_path / "c2")
    assert got.read_bytes() == wheel.read_bytes() and list(got.parent.iterdir()) == [got]

# ----------------------------------------------------------------------------- GGUF metadata (8-10)


@pytest.mark.parametrize("changes, message", [
    ({"llama.attention.head_count": 0},
     "metadata 'llama.attention.head_count' is int 0, expected a positive integer"),
    ({"llama.attention.head_count": 5},
     "metadata 'llama.attention.head_count' 5 does not divide 'llama.embedding_length' 64"),
    ({"llama.attention.head_count_kv": 3},
     "metadata 'llama.attention.head_count_kv' 3 does not divide 'llama.attention.head_count' 4"),
    ({"llama.attention.head_count_kv": 0},
     "metadata 'llama.attention.head_count_kv' is int 0, expected a positive integer"),
    ({"llama.embedding_length": 0},
     "metadata 'llama.embedding_length' is int 0, expected a positive integer"),
    ({"llama.block_count": "2"}, "metadata 'llama.block_count' is str '2', expected a positive"),
    ({"tokenizer.ggml.eos_token_id": 1000},
     "metadata 'tokenizer.ggml.eos_token_id' is int 1000, not the id of one of the 1000 tokens"),
])
def test_gguf_head_counts_and_ids_are_checked_before_use(tmp_path, changes, message):
    path = f32_copy(tmp_path / "m.gguf", **changes)
    for load in (model.from_pretrained, formats.load_tokenizer):
        with pytest.raises(ValueError, match=f"{path}: {message}"):
            load(path)


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer.ggml.tokens": [7, 8, 9]},
     "metadata 'tokenizer.ggml.tokens' must be an array of strings, found an array holding int 7"),
    ({"tokenizer.ggml.tokens": "<s>"},
     "metadata 'tokenizer.ggml.tokens' must be an array of strings, found str '<s>'"),
    ({"tokenizer.ggml.merges": [1, 2]},
     "metadata 'tokenizer.ggml.merges' must be an array of strings, found an array holding int 1"),
    ({"tokenizer.ggml.bos_token_id": 5000, "tokenizer.ggml.add_bos_token": True},
     "metadata 'tokenizer.ggml.bos_token_id' is int 5000, not the id of one of the 1000 tokens"),
    ({"tokenizer.ggml.bos_token_id": 1.0, "tokenizer.ggml.add_bos_token": True},
     "metadata 'tokenizer.ggml.bos_token_id' is float 1.0, not the id of one of the 1000 tokens"),
])
def test_gguf_tokenizer_metadata_of_the_wrong_kind(tmp_path, changes, message):
    path = f32_copy(tmp_path / "m.gguf", **changes)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        formats.load_tokenizer(path)
