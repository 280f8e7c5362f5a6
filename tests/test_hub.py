"""Hub repo ids as convert's SRC, against a real Hugging Face cache layout, offline.

The cache is laid out as huggingface_hub writes it (``models--org--name/blobs`` named by
git blob sha1 or LFS sha256, ``snapshots/<commit>/<file>`` relative symlinks into blobs,
``refs/<branch or tag>`` holding the commit) and checked with huggingface_hub's own
``scan_cache_dir`` and ``try_to_load_from_cache`` before gguf-moe reads it.  No network:
``HF_HUB_OFFLINE=1`` and every socket connection fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.synth import make_model

huggingface_hub = pytest.importorskip("huggingface_hub")

REPO = "merge-lab/Hub-MoE-4x"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)


def _blob_id(data: bytes, lfs: bool) -> str:
    if lfs:  # LFS files are stored under their sha256
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


def add_revision(cache: Path, repo_id: str, src: Path, commit: str, refs: tuple[str, ...] = ()) -> Path:
    """Put the files of ``src`` in ``cache`` as revision ``commit`` of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / _blob_id(data, f.suffix == ".safetensors" or f.suffix == ".model")
        if not blob.exists():
            blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


COMMIT_MAIN = "1a2b3c4d5e6f708192a3b4c5d6e7f80912a3b4c5"
COMMIT_OLD = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-src")
    new = make_model(root / "new" / "Hub-MoE-4x", seed=21, model_card=True)
    old = make_model(root / "old" / "Hub-MoE-4x", seed=22, n_expert=2, top_k=1)
    return new, old


@pytest.fixture(scope="module")
def cache(sources, tmp_path_factory) -> Path:
    new, old = sources
    c = tmp_path_factory.mktemp("hf") / "hub"
    add_revision(c, REPO, old, COMMIT_OLD, refs=("v1",))
    add_revision(c, REPO, new, COMMIT_MAIN, refs=("main",))
    return c


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    r = run(*args)
    assert r.exit_code == 0, r.output
    return r


def test_the_cache_is_what_huggingface_hub_reads(cache, sources):
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    revs = {r.commit_hash: r for r in repo.revisions}
    assert set(revs) == {COMMIT_MAIN, COMMIT_OLD}
    assert revs[COMMIT_MAIN].refs == frozenset({"main"}) and revs[COMMIT_OLD].refs == frozenset({"v1"})
    assert {f.file_name for f in revs[COMMIT_MAIN].files} == {p.name for p in sources[0].iterdir()}
    got = huggingface_hub.try_to_load_from_cache(REPO, "config.json", cache_dir=cache, revision="v1")
    assert Path(got).read_bytes() == (sources[1] / "config.json").read_bytes()


@pytest.mark.parametrize("rev", [None, "main", COMMIT_MAIN, "v1", COMMIT_OLD])
def test_repo_id_converts_like_the_local_directory(cache, sources, rev, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    local = sources[1] if rev in ("v1", COMMIT_OLD) else sources[0]
    ok("convert", local, "-t", "Q8_0", "-o", tmp_path / "local.gguf", "-q")
    ok("convert", REPO if rev is None else f"{REPO}@{rev}", "-t", "Q8_0", "-o", tmp_path / "hub.gguf", "-q")
    assert (tmp_path / "hub.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()
    r = gguf.GGUFReader(tmp_path / "hub.gguf")
    assert r.fields["general.name"].contents() == "Hub MoE 4x"
    for f in r.fields.values():  # no commit-hash folder name anywhere in the metadata
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            assert COMMIT_MAIN not in f.contents() and COMMIT_OLD not in f.contents()


def test_outdir_names_and_card_from_the_repo(cache, tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("HF_HOME", str(cache.parent))  # HF_HOME/hub
    ok("convert", REPO, "-t", "Q8_0", "--outdir", tmp_path / "out", "-q")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Hub-MoE-4x-Q8_0.gguf", "README.md"]
    text = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == REPO and front["license"] == "apache-2.0"
    assert f"https://huggingface.co/{REPO}" in text


def test_a_local_directory_of_that_name_wins(cache, sources, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    shutil.copytree(sources[1], tmp_path / REPO)  # ./merge-lab/Hub-MoE-4x holds the old revision
    monkeypatch.chdir(tmp_path)
    ok("convert", REPO, "-t", "Q8_0", "-o", "x.gguf", "-q")
    ok("convert", sources[1], "-t", "Q8_0", "-o", "ref.gguf", "-q")
    assert Path("x.gguf").read_bytes() == Path("ref.gguf").read_bytes()


@pytest.mark.parametrize("src", ["merge-lab/No-Such-Model", f"{REPO}@v9", f"{REPO}@{'e' * 40}"])
def test_an_unresolvable_repo_id_is_one_line(cache, src, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    r = run("convert", src, "-t", "Q8_0", "-o", tmp_path / "x.gguf")
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}: ") and "HF_HUB_OFFLINE" in lines[0], r.output
    assert not list(tmp_path.iterdir())


def test_not_a_repo_id_nor_a_directory(tmp_path):
    r = run("convert", tmp_path / "nothing-here", "-t", "Q8_0", "-o", tmp_path / "x.gguf")
    assert r.exit_code == 1 and "not a directory" in r.output


def test_parse_repo_id():
    from gguf_moe.hub import parse_repo_id

    assert parse_repo_id("org/name") == ("org/name", None)
    assert parse_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_repo_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for bad in ("name", "org/name/extra", "/abs/path", "./org/name", "org/..", "org/name@", "a b/c"):
        assert parse_repo_id(bad) is None, bad


def test_only_the_weights_conversion_reads_are_fetched(sources, tmp_path):
    """The shards the index lists (what gguf_moe.source reads), not every *.safetensors."""
    import json

    from gguf_moe.hub import HUB_PATTERNS, _weight_patterns
    from gguf_moe.source import index_tensors

    src = sources[0]
    wm = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert _weight_patterns(src) == sorted(set(wm.values()))
    assert {t.shard.path.name for t in index_tensors(src).values()} == set(_weight_patterns(src))
    single = make_model(tmp_path / "one", seed=1, shards=1)
    assert not (single / "model.safetensors.index.json").exists()
    assert _weight_patterns(single) == ["model.safetensors", "model*.safetensors"]
    assert not any(p.endswith(".safetensors") for p in HUB_PATTERNS)
