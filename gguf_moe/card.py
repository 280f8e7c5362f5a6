"""The Hugging Face model card (``README.md``) ``convert --outdir`` writes next to the files.

YAML front matter (``base_model``: the source repo id or directory name, ``tags`` with
``gguf``, ``moe`` and, for a mergekit-moe recipe, ``mergekit`` and ``frankenmoe``, the
source's ``license``), the recipe's base and expert models, a table of every file written
(type, size, bits per weight, split parts, and evaluation figures when given) and how to
run the files with llama.cpp and ollama.

The card carries a marker comment; a README.md without it (not written by gguf-moe) is
never replaced unless ``force``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gguf_moe import __version__
from gguf_moe.errors import GgufMoeError
from gguf_moe.space import fmt_size

__all__ = [
    "CardFile",
    "MARKER",
    "card_path",
    "check_card_free",
    "render_card",
    "write_card",
    "source_license",
    "load_eval",
    "eval_figures",
]

MARKER = "<!-- model card written by gguf-moe: it rewrites this file; remove this line to keep your edits -->"


@dataclass
class CardFile:
    """One output: its type, its files (one, or the shards of a split set), bits per weight."""

    type: str
    paths: list[Path]
    bits_per_weight: float
    figures: dict[str, Any] = field(default_factory=dict)  # evaluation figures, column -> value

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


def card_path(outdir: Path) -> Path:
    return Path(outdir) / "README.md"


def check_card_free(outdir: Path, force: bool = False) -> None:
    """Refuse (before any work) to replace a README.md that gguf-moe did not write."""
    path = card_path(outdir)
    if not path.exists() or force:
        return
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise GgufMoeError(f"{path}: cannot read the existing README.md ({e.strerror or e})") from None
    if MARKER not in text:
        raise GgufMoeError(
            f"{path}: exists and was not written by gguf-moe; pass --no-card to leave it, or --force to replace it"
        )


def source_license(model_dir: Path) -> str | None:
    """The ``license`` of the source model's own card, if it has one."""
    front = _front_matter(Path(model_dir) / "README.md")
    lic = front.get("license") if isinstance(front, dict) else None
    return str(lic) if isinstance(lic, (str, int, float)) and str(lic) else None


def _front_matter(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    try:
        return yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return None


def load_eval(path: Path) -> dict:
    """``gguf-moe eval --json`` output: ``{"tokens", "source": {"ppl"}, "files": [{"file",
    "type", "ppl", "kld_mean", "kld_p99", "top1", ...}]}``.  Raises GgufMoeError (one line)."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GgufMoeError(f"{path}: not readable as `gguf-moe eval --json` output ({e})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and "file" in f for f in files):
        raise GgufMoeError(f"{path}: expected the JSON object `gguf-moe eval --json` prints (with a 'files' list)")
    return data


def eval_figures(data: dict, f: CardFile) -> dict[str, Any]:
    """The card's columns for ``f`` from eval output: matched by file name (the set's first
    shard, or the file), else by type when only one evaluated file has it."""
    names = {p.name for p in f.paths}
    entries = data.get("files", [])
    hit = [e for e in entries if Path(str(e["file"])).name in names]
    if not hit:
        same = [e for e in entries if str(e.get("type", "")).upper() == f.type.upper()]
        hit = same if len(same) == 1 else []
    if not hit:
        return {}
    e = hit[0]
    out: dict[str, Any] = {}
    src = (data.get("source") or {}).get("ppl")
    if isinstance(e.get("ppl"), (int, float)):
        out["PPL"] = float(e["ppl"])
        if isinstance(src, (int, float)) and src > 0:
            out["ΔPPL"] = f"{100 * (e['ppl'] / src - 1):+.2f}%"
    if isinstance(e.get("kld_mean"), (int, float)):
        out["KLD mean"] = f"{e['kld_mean']:.6f}"
    if isinstance(e.get("top1"), (int, float)):
        out["top-1"] = f"{100 * e['top1']:.2f}%"
    return out


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_card(
    *,
    name: str,
    base_model: str,
    base_is_repo: bool,
    recipe: dict | None,
    files: Sequence[CardFile],
    license: str | None = None,
    evaluated_tokens: int | None = None,
) -> str:
    """The card's text.  ``base_model``: the source repo id (``base_is_repo``) or directory name."""
    tags = ["gguf", "moe"]
    if recipe is not None:
        tags += ["mergekit", "frankenmoe"]
    tags.append("llama.cpp")
    front: dict[str, Any] = {"base_model": base_model}
    if base_is_repo:
        front["base_model_relation"] = "quantized"
    if license:
        front["license"] = license
    front["tags"] = tags
    out = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", MARKER, ""]
    src = f"[{base_model}](https://huggingface.co/{base_model})" if base_is_repo else f"`{base_model}`"
    out += [f"# {name} GGUF", "", f"GGUF files of {src} for llama.cpp, converted with gguf-moe {__version__}.", ""]

    if recipe is not None:
        out += ["## Merge recipe", ""]
        if recipe.get("base_model"):
            out += [f"Base model: `{recipe['base_model']}`"]
        gm = recipe.get("gate_mode")
        if gm:
            out[-1:] = [out[-1] + f", gate mode `{gm}`" if recipe.get("base_model") else f"Gate mode: `{gm}`"]
        out += ["", "| Expert | Source model | Positive prompts |", "|---:|---|---|"]
        for i, e in enumerate(recipe.get("experts") or []):
            prompts = e.get("positive_prompts") or []
            if isinstance(prompts, str):
                prompts = [prompts]
            shown = ", ".join(f"“{p}”" for p in prompts[:3]) + (", ..." if len(prompts) > 3 else "")
            out.append(f"| {i} | `{_cell(e.get('source_model', ''))}` | {_cell(shown)} |")
        out.append("")

    figures = list(dict.fromkeys(k for f in files for k in f.figures))
    out += ["## Files", ""]
    head = ["File", "Type", "Size", "Bits per weight", "Parts", *figures]
    out += ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for f in files:
        first = f.paths[0].name
        row = [f"`{first}`", f.type, fmt_size(f.size), f"{f.bits_per_weight:.2f}", str(len(f.paths))]
        row += [_cell(f.figures[k]) if k in f.figures else "" for k in figures]
        out.append("| " + " | ".join(row) + " |")
    if figures:
        out += ["", "PPL, KLD (KL divergence from the source model's distribution per token) and top-1 agreement "
                "from `gguf-moe eval`" + (f" on {evaluated_tokens} tokens." if evaluated_tokens else ".")]
    if any(len(f.paths) > 1 for f in files):
        out += ["", "Split files (`-00001-of-0000N.gguf`) are llama-gguf-split sets: give llama.cpp the first part "
                "and it loads the others; `llama-gguf-split --merge FIRST.gguf OUT.gguf` joins them."]
    out.append("")

    ex = files[0] if files else None
    first = ex.paths[0].name if ex else f"{name}-Q4_K_M.gguf"
    single = next((f for f in files if len(f.paths) == 1), None)
    out += [
        "## Run",
        "",
        "llama.cpp:",
        "",
        "```bash",
        f'llama-cli -m {first} -p "Hello"',
        f"llama-server -m {first} --port 8080",
        "```",
        "",
        "ollama (imports one file; merge a split set first):",
        "",
        "```bash",
        f"echo 'FROM ./{single.paths[0].name if single else name + '.gguf'}' > Modelfile",
        f"ollama create {name.lower()} -f Modelfile",
        f"ollama run {name.lower()}",
        "```",
        "",
    ]
    return "\n".join(out)


def write_card(outdir: Path, text: str, *, force: bool = False) -> Path:
    """Write ``<outdir>/README.md`` (atomically; refusing a README.md gguf-moe did not write)."""
    check_card_free(outdir, force)
    path = card_path(outdir)
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GgufMoeError(f"{path}: cannot write the model card ({e.strerror or e})") from None
    return path
