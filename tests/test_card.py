"""The model card ``convert --outdir`` writes, and ``inspect`` at 80 columns."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.space import fmt_size
from gguf_moe.synth import make_model


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def ok(*args, **kw):
    r = run(*args, **kw)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("src") / "Card-MoE-4x", seed=41, model_card=True)


@pytest.fixture(scope="module")
def outdir(model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("out")
    ok("convert", model, "-t", "Q4_K_M", "-t", "BF16", "--outdir", d, "--split-max-size", "2M", "-q")
    return d


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def table(text: str, header: str) -> list[list[str]]:
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_front_matter(outdir, model):
    front = front_matter((outdir / "README.md").read_text())
    assert front["base_model"] == "Card-MoE-4x"
    assert {"gguf", "moe", "mergekit", "frankenmoe"} <= set(front["tags"])
    source = yaml.safe_load((model / "README.md").read_text().split("---")[1])
    assert front["license"] == source["license"]


def test_files_table_matches_the_files(outdir):
    import json

    rows = table((outdir / "README.md").read_text(), "File")
    assert [r[1] for r in rows] == ["Q4_K_M", "BF16"]
    for name, typ, size, bpw, parts in (r[:5] for r in rows):
        first = outdir / name.strip("`")
        m = re.fullmatch(r"(.+)-00001-of-(\d{5})\.gguf", first.name)
        files = sorted(outdir.glob(f"{m.group(1)}-*-of-{m.group(2)}.gguf")) if m else [first]
        assert first.is_file() and int(parts) == len(files)
        assert size == fmt_size(sum(p.stat().st_size for p in files))
        info = json.loads(ok("inspect", first, "--json").output)
        assert bpw == f"{info['totals']['bits_per_weight']:.2f}"
    assert sorted(outdir.glob("*.gguf")) == sorted(
        p for r in rows for p in outdir.glob(r[0].strip("`").replace("-00001-of-", "-*-of-"))
    )  # every file written is in the table


def test_recipe_models_and_how_to_run(outdir, model):
    text = (outdir / "README.md").read_text()
    recipe = yaml.safe_load((model / "mergekit_moe_config.yml").read_text())
    assert f"`{recipe['base_model']}`" in text
    rows = table(text, "Expert")
    assert [r[1].strip("`") for r in rows] == [e["source_model"] for e in recipe["experts"]]
    first = table(text, "File")[0][0].strip("`")
    assert f"llama-cli -m {first}" in text and "ollama create" in text


def test_dense_model_without_recipe(tmp_path):
    src = make_model(tmp_path / "Dense-7", layout="dense", seed=1)
    ok("convert", src, "-t", "Q8_0", "--outdir", tmp_path / "out", "-q")
    front = front_matter((tmp_path / "out" / "README.md").read_text())
    assert "mergekit" not in front["tags"] and "frankenmoe" not in front["tags"] and "gguf" in front["tags"]


def test_a_foreign_readme_is_never_overwritten_silently(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    r = run("convert", model, "-t", "Q8_0", "--outdir", out)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "not written by gguf-moe" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # stopped before any work
    ok("convert", model, "-t", "Q8_0", "--outdir", out, "--no-card", "-q")
    assert (out / "README.md").read_text() == "# my notes\n"
    ok("convert", model, "-t", "Q8_0", "--outdir", out, "--force", "-q")
    assert "gguf-moe" in (out / "README.md").read_text()
    # our own card is rewritten
    ok("convert", model, "-t", "Q5_K_M", "--outdir", out, "-q")
    assert [r[1] for r in table((out / "README.md").read_text(), "File")] == ["Q5_K_M"]


def test_inspect_keeps_keys_whole_at_80_columns(outdir):
    first = sorted(outdir.glob("Card-MoE-4x-Q4_K_M-*.gguf"))[0]
    import json

    keys = [e["key"] for e in json.loads(ok("inspect", first, "--json").output)["kv"]]
    assert "general.base_model.0.organization" in keys
    out = ok("inspect", first, terminal_width=80, env={"COLUMNS": "80"}).output
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    for k in keys:
        assert any(re.search(rf"│ {re.escape(k)} +│", line) for line in lines), k
    # long values are shortened, on one line
    tmpl = next(line for line in lines if "tokenizer.chat_template" in line)
    assert "…" in tmpl


def _eval_json(model: Path, files: list[Path], tmp_path: Path) -> Path:
    """Figures from the real ``gguf-moe eval --json`` when the command is there, else the
    same JSON from its result type."""
    import json

    out = tmp_path / "eval.json"
    if "eval" in main.commands:
        from gguf_moe.synth import _training_text

        text = tmp_path / "text.txt"
        text.write_text(_training_text() * 3)
        r = ok("eval", model, *files, "-f", text, "--ctx", "64", "--chunks", "2", "--json")
        out.write_text(r.output)
        return out
    ev = pytest.importorskip("gguf_moe.evaluate")
    res = ev.EvalResult(tokens=62, source_ppl=20.0)
    for i, f in enumerate(files):
        res.files.append(ev.FileScore(str(f), "Q4_K_M" if "Q4_K_M" in f.name else "Q8_0", f.stat().st_size, 4.9,
                                      20.5 + i, 0.01 * (i + 1), 0.05, 0.97 - i / 100))  # fmt: skip
    out.write_text(json.dumps(res.to_dict()))
    return out


def test_card_shows_eval_figures(model, tmp_path):
    import json

    first = tmp_path / "first"
    ok("convert", model, "-t", "Q4_K_M", "-t", "Q8_0", "--outdir", first, "-q", "--no-card")
    files = sorted(first.glob("*.gguf"))
    ev = _eval_json(model, files, tmp_path)
    data = json.loads(ev.read_text())
    ok("convert", model, "-t", "Q4_K_M", "-t", "Q8_0", "--outdir", tmp_path / "out", "-q", "--card-eval", ev)
    text = (tmp_path / "out" / "README.md").read_text()
    rows = {r[1]: r for r in table(text, "File")}
    header = next(line for line in text.splitlines() if line.startswith("| File |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    for e in data["files"]:
        row = dict(zip(cols, rows[e["type"]]))
        assert row["PPL"] == f"{e['ppl']:.4g}" and row["KLD mean"] == f"{e['kld_mean']:.6f}"
        assert row["top-1"] == f"{100 * e['top1']:.2f}%"
    r = run("convert", model, "-t", "Q8_0", "-o", tmp_path / "x.gguf", "--card-eval", ev)
    assert r.exit_code == 2 and "--outdir" in r.output
    (tmp_path / "bad.json").write_text("[1, 2]")
    r = run("convert", model, "-t", "Q8_0", "--outdir", tmp_path / "o2", "--card-eval", tmp_path / "bad.json")
    assert r.exit_code == 2 and "gguf-moe eval --json" in r.output
