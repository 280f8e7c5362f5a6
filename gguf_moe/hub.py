"""Hugging Face Hub repo ids as the source of a conversion.

``SRC`` may be a local directory or ``org/name`` / ``org/name@revision``.  A local
directory of that name wins (as in transformers).  Otherwise ``huggingface_hub`` resolves
the repo: only the files conversion reads (``HUB_PATTERNS``) are fetched, into its cache
(``HF_HUB_CACHE``, or ``HF_HOME``/hub); with ``HF_HUB_OFFLINE=1`` the cache alone must do.

The snapshot folder in the cache is named by commit hash, and gguf-py derives
``general.name``, ``general.basename`` ... from the model folder's name, so conversion reads
the snapshot through a temporary folder named after the repo (links to the snapshot's
files): the output is the same as converting a local clone of the repo.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gguf_moe.errors import GgufMoeError

__all__ = ["HubSource", "HUB_PATTERNS", "parse_repo_id", "resolve_repo", "open_source"]

#: what ``convert`` reads from a model repo besides the weights (gguf-py's metadata also
#: reads README.md and generation_config.json, so a repo gives the same GGUF as its local
#: clone); the weights are the shards the index lists, else ``model*.safetensors``
#: (never e.g. a second ``consolidated.safetensors`` copy some repos carry)
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "mergekit_moe_config.yml",
    "README.md",
]

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_RE = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9._/-]*))?$")


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str | None
    snapshot: Path  # the cache's snapshot folder (named by commit hash)

    @property
    def name(self) -> str:
        return self.repo_id.split("/", 1)[1]

    @property
    def commit(self) -> str:
        return self.snapshot.name

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` for ``org/name`` or ``org/name@revision``; None otherwise."""
    m = _REPO_RE.match(str(text))
    if not m or ".." in m.group("repo") or m.group("repo").endswith((".", "-")):
        return None
    return m.group("repo"), m.group("rev")


def _is_true(v: str | None) -> bool:
    return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir() -> str | None:
    """The cache huggingface_hub uses, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve_repo(repo_id: str, revision: str | None = None) -> HubSource:
    """The snapshot folder holding the conversion's files of ``repo_id`` at ``revision``
    (default branch when None); downloads what is missing unless ``HF_HUB_OFFLINE``."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise GgufMoeError(f"{repo_id}: reading Hub repos needs huggingface_hub (pip install huggingface_hub)") from None
    offline = _is_true(os.environ.get("HF_HUB_OFFLINE")) or bool(getattr(constants, "HF_HUB_OFFLINE", False))
    cache = _cache_dir()
    shown = f"{repo_id}@{revision}" if revision else repo_id

    def fetch(rev: str | None, patterns: list[str]) -> Path:
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=rev, allow_patterns=patterns, cache_dir=cache, local_files_only=offline,
        ))  # fmt: skip

    try:
        path = fetch(revision, HUB_PATTERNS)
        # the weights of that same commit (a branch may move between two calls)
        path = fetch(path.name, _weight_patterns(path))
    except Exception as e:  # huggingface_hub's errors: not found, gated, offline, network
        where = cache or getattr(constants, "HF_HUB_CACHE", "the Hugging Face cache")
        kind = type(e).__name__
        if offline and kind in ("LocalEntryNotFoundError", "IncompleteSnapshotError", "FileNotFoundError"):
            why = f"not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE is set"
        elif kind == "RepositoryNotFoundError":
            why = "no such repo on the Hub (or it is private: log in with `hf auth login`)"
        elif kind == "RevisionNotFoundError":
            why = f"no revision {revision!r} in the repo"
        elif kind == "GatedRepoError":
            why = "the repo is gated: accept its terms on the Hub and log in"
        elif kind == "HFValidationError":
            why = "not a valid repo id"
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else kind
            why = f"cannot be fetched ({kind}: {first})"
        raise GgufMoeError(f"{shown}: {why}; give a local model directory or a repo id the Hub has") from None
    return HubSource(repo_id, revision, path)


def _weight_patterns(snapshot: Path) -> list[str]:
    """The safetensors files conversion reads (``source.index_tensors``'s choice)."""
    import json

    try:
        wm = json.loads((snapshot / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
        names = sorted({v for v in wm.values() if isinstance(v, str) and "/" not in v})
        if names:
            return names
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no index (or a broken one, which conversion reports)
    return ["model.safetensors", "model*.safetensors"]


def _view(src: HubSource) -> tuple[Path, Path]:
    """A temporary folder named like the repo holding links to the snapshot's entries."""
    tmp = Path(tempfile.mkdtemp(prefix="gguf-moe-hub-"))
    view = tmp / src.name
    view.mkdir()
    for entry in sorted(src.snapshot.iterdir()):
        (view / entry.name).symlink_to(entry.absolute())
    return tmp, view


@contextlib.contextmanager
def open_source(text: str | os.PathLike) -> Iterator[tuple[Path, HubSource | None]]:
    """``(model directory, HubSource or None)`` for a conversion's SRC argument; the
    directory stays valid inside the ``with`` block."""
    path = Path(text)
    parsed = None if path.exists() else parse_repo_id(str(text))
    if parsed is None:
        yield path, None
        return
    src = resolve_repo(*parsed)
    tmp, view = _view(src)
    try:
        yield view, src
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
