"""``gguf-moe imatrix`` against the real ``llama-imatrix`` (built from the oracle's sdist) and
the layer-by-layer forward pass against transformers.

llama-imatrix runs on the F32 GGUF that ``convert -t F32`` writes, with exact attention
(``-fa off -ctk f32 -ctv f32``), the same text, ``-c`` and ``--chunks``.  Both sides then do
the same float32 arithmetic and differ only in summation order: measured on these models,
in_sum2 differs by at most 4e-6 relative and every count (dense and per expert) is equal.
The tests allow 1e-4 relative (25x the measurement; a BOS, chunking, permutation or routing
error moves values by 1e-2 or more) and expert counts that differ by at most 2 tokens (a
router tie within float noise may go either way; then that expert's sums may differ by
those tokens' share).

Every MoE merge here has one expert that no token can reach (``kill_expert``): the
residual stream carries a constant feature no layer writes to, and that expert's router row
looks only at it, with a large negative weight.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.synth import _training_text, make_model
from llamaref import assert_imatrix_matches, run_llama_imatrix

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

CTX = 64
CHUNKS = 6
RTOL = 1e-4
MAX_COUNT_DIFF = 2


def llama_bin(tool: str) -> Path | None:
    """A llama.cpp tool built by ``scripts/setup.sh --dev`` (``.cache/llama-bin``) or in
    ``$GGUF_MOE_LLAMA_BIN``."""
    env = os.environ.get("GGUF_MOE_LLAMA_BIN")
    d = Path(env) if env else Path(__file__).resolve().parents[1] / ".cache" / "llama-bin"
    p = d / tool
    return p if p.is_file() and os.access(p, os.X_OK) else None


def text_file(root: Path) -> Path:
    """Wikitext-like: starts with whitespace (" = Title = "), as wiki.test.raw does."""
    p = root / "calib.txt"
    p.write_text(" = Valkyria Chronicles = \n \n " + _training_text()[:40000], encoding="utf-8")
    return p


def kill_expert(src: Path, expert: int, column: int = 0) -> None:
    """Make ``expert`` unreachable in every layer: residual feature ``column`` is a small
    positive constant (embedding column 0.05, the embeddings' own scale; nothing writes to
    it: o_proj / down rows zero), its norm weight 1, and the router sees it only through
    that expert's row (-2000: a logit of -100 or less; other rows 0 there)."""
    from safetensors.torch import load_file, save_file

    for f in sorted(src.glob("*.safetensors")):
        t = load_file(f)
        for name, x in t.items():
            if name == "model.embed_tokens.weight":
                x[:, column] = 0.05
            elif name.endswith(("o_proj.weight", "down_proj.weight", ".w2.weight")) or name.endswith("experts.down_proj"):
                if x.dim() == 3:  # fused [E, d, ff]
                    x[:, column, :] = 0.0
                else:
                    x[column, :] = 0.0
            elif name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")):
                x[column] = 1.0
            elif name.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight")):
                x[:, column] = 0.0
                x[expert, :] = 0.0
                x[expert, column] = -2000.0
        save_file(t, f, metadata={"format": "pt"})


def make_qwen(root: Path) -> Path:
    from test_qwen2moe import make_qwen2moe

    tok = make_model(root / "qwen-tok", layout="dense", tokenizer="bpe", n_layer=1, hidden=64, ff=64, seed=9)
    return make_qwen2moe(root / "qwen2moe-4x", tok, layout="fused", seed=3)


MODELS = {
    # name: (builder, dead expert or None)
    "fused-4x-spm": (lambda r: make_model(r / "fused-4x", layout="fused", n_expert=4, top_k=2, tokenizer="spm", seed=11), 2),
    "legacy-8x-bpe": (lambda r: make_model(r / "legacy-8x", layout="legacy", n_expert=8, top_k=2, tokenizer="bpe",
                                           hidden=256, ff=256, seed=12), 5),
    "dense-mistral": (lambda r: make_model(r / "dense", layout="dense", tokenizer="spm", seed=13), None),
    "qwen2moe-4x": (make_qwen, 1),
}


def run_cli(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            build, dead = MODELS[name]
            src = build(root)
            if dead is not None:
                kill_expert(src, dead)
            f32 = root / "model-f32.gguf"
            code, out, err = run_cli("convert", src, "-t", "F32", "-o", f32, "-q")
            assert code == 0, err
            cache[name] = (src, f32, text_file(root))
        return cache[name]

    return get


# --------------------------------------------------------------------------- tokenization


@pytest.mark.parametrize("tok", ["spm", "bpe"])
def test_tokenization_matches_llama_cpp(tok, tmp_path):
    from gguf_moe.source import open_model
    from gguf_moe.textinput import load_tokenizer

    src = make_model(tmp_path / tok, layout="dense", tokenizer=tok, n_layer=1, hidden=64, ff=64, seed=4)
    f32 = tmp_path / "m.gguf"
    assert run_cli("convert", src, "-t", "F32", "-o", f32, "-q")[0] == 0
    llm = llama_cpp.Llama(model_path=str(f32), vocab_only=True, verbose=False)
    text = _training_text()
    rng = np.random.default_rng(5)
    samples = [" = Valkyria Chronicles III = \n \n Senjō no", "  two leading spaces", "\n\n newline first", "\tTab",
               "x<|im_start|>y <|im_end|> z", "<s> and </s> as text", "emoji 🦙 ✅", ""]  # fmt: skip
    samples += [text[a : a + int(n)] for a, n in zip(rng.integers(0, len(text), 40), rng.integers(1, 300, 40))]
    samples.append(text[:20000])
    with open_model(src) as m:
        ours = load_tokenizer(m)
    for s in samples:
        want = llm.tokenize(s.encode(), add_bos=True, special=False)
        assert ours.encode(s) == want, repr(s[:60])
    llm.close()


def test_chunks_replace_first_token_with_bos():
    from gguf_moe.textinput import make_chunks

    toks = list(range(100, 400))
    c = make_chunks(toks, 64, None, 1, True, "t")
    assert c.shape == (4, 64)
    assert (c[:, 0] == 1).all() and c[1, 1] == 100 + 65 and c[3, 63] == 100 + 4 * 64 - 1
    assert make_chunks(toks, 64, 2, 1, False, "t")[1, 0] == 164
    with pytest.raises(Exception, match="at least 256"):
        make_chunks(toks[:200], 128, None, 1, True, "t")


# --------------------------------------------------------------------------- forward vs transformers


def runner_logits(src: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two chunks of 48 random tokens and the runner's logits for them (source weights in
    GGUF layout, llama.cpp's rotary order)."""
    from gguf_moe.runner import ModelSpec, Runner, SourceWeights
    from gguf_moe.source import open_model

    rng = np.random.default_rng(1)
    with open_model(src) as m:
        spec = ModelSpec.from_source(m)
        chunks = rng.integers(3, spec.n_vocab, size=(2, 48))
        w = SourceWeights(m)
        r = Runner(spec)
        with torch.no_grad():
            H = r.run_layers(w, chunks)
            head = r.load_head(w)
            return chunks, r.logits(head, r.head_input(head, H)).numpy()


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_matches_transformers(built, name):
    """The runner's logits (source weights in GGUF layout, llama.cpp's rotary order) equal
    transformers' own model's: same float32 arithmetic, measured max |diff| < 3e-4."""
    src, _, _ = built(name)
    chunks, ours = runner_logits(src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(chunks)).logits.numpy()
    d = np.abs(ours - ref)
    assert d.max() < 1e-3, f"{name}: max |diff| {d.max():.2e}"
    assert d.mean() < 2e-5, f"{name}: mean |diff| {d.mean():.2e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


# --------------------------------------------------------------------------- against llama-imatrix


@pytest.mark.parametrize("name", list(MODELS))
def test_imatrix_matches_llama_imatrix(built, name, tmp_path):
    tool = llama_bin("llama-imatrix")
    if tool is None:
        pytest.skip("llama-imatrix not built (scripts/setup.sh --dev)")
    src, f32, text = built(name)
    dead = MODELS[name][1]
    process_output = name == "dense-mistral"
    extra = ["--process-output"] if process_output else []
    ref = tmp_path / "ref.gguf"
    run_llama_imatrix(tool, f32, text, ref, CTX, CHUNKS, *extra)
    ours = tmp_path / "ours.gguf"
    code, out, err = run_cli("imatrix", src, "-f", text, "-o", ours, "--ctx", CTX, "--chunks", CHUNKS, "--device", "cpu",
                             "--json", *extra)  # fmt: skip
    assert code == 0, err
    report = json.loads(out)

    t_ref, t_ours, names_ours, worst = assert_imatrix_matches(ref, ours, CTX * CHUNKS, RTOL, MAX_COUNT_DIFF)
    assert process_output == ("output.weight.in_sum2" in names_ours)
    assert not any(n.startswith("token_embd") for n in names_ours)
    print(f"{name}: max rel in_sum2 {worst:.2e}")

    # per-expert token counts, the diagnostic: the unreachable expert got none, everywhere
    if dead is None:
        assert report["expert_tokens"] == [] and report["unrouted"] == []
    else:
        n_layer = len(report["expert_tokens"])
        zero_ref = []
        for L in range(n_layer):
            c_ref = t_ref[f"blk.{L}.ffn_gate_exps.weight.counts"].reshape(-1)
            assert c_ref[dead] == 0
            zero_ref += [{"layer": L, "expert": e} for e in np.flatnonzero(c_ref == 0).tolist()]
            assert report["expert_tokens"][L] == [int(c) for c in t_ours[f"blk.{L}.ffn_gate_exps.weight.counts"].reshape(-1)]
        assert report["unrouted"] == zero_ref  # the forced one, and any the text left unrouted
        for u in report["unrouted"]:
            assert f"layer {u['layer']} expert {u['expert']} received no tokens" in err
        print(f"{name}: unrouted {[(u['layer'], u['expert']) for u in report['unrouted']]}")
    assert report["chunks"] == CHUNKS and report["tokens"] == CHUNKS * CTX


def test_imatrix_is_read_by_llama_quantize_and_convert(built, tmp_path):
    tool = llama_bin("llama-quantize")
    if tool is None:
        pytest.skip("llama-quantize not built (scripts/setup.sh --dev)")
    src, f32, text = built("fused-4x-spm")
    im = tmp_path / "im.gguf"
    assert run_cli("imatrix", src, "-f", text, "-o", im, "--ctx", CTX, "--chunks", 3, "--device", "cpu")[0] == 0
    r = subprocess.run([tool, "--imatrix", im, f32, tmp_path / "q.gguf", "Q4_K_M", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "imatrix" in (r.stdout + r.stderr)
    from gguf_moe.imatrix import load_imatrix

    loaded = load_imatrix(im)
    assert loaded.chunk_count == 3 and loaded.datasets == [str(text)]
    assert loaded.entries["blk.0.ffn_gate_exps.weight"].reshape(4, -1)[2].tolist() == [1.0] * 256  # unrouted: ones


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line(built, tmp_path, monkeypatch):
    src, f32, text = built("fused-4x-spm")
    short = tmp_path / "short.txt"
    short.write_text("only a few words here", encoding="utf-8")
    code, out, err = run_cli("imatrix", src, "-f", short, "-o", tmp_path / "x.gguf", "--ctx", CTX, "--device", "cpu")
    assert code == 1 and err.startswith("error: ") and "at least 128" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()

    bad = tmp_path / "phi"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["PhiForCausalLM"]}))
    code, out, err = run_cli("imatrix", bad, "-f", text, "-o", tmp_path / "x.gguf")
    assert code == 1 and "not supported" in err and len(err.strip().splitlines()) == 1

    if not torch.cuda.is_available():
        code, out, err = run_cli("imatrix", src, "-f", text, "-o", tmp_path / "x.gguf", "--device", "cuda")
        assert code == 1 and "CUDA" in err and len(err.strip().splitlines()) == 1

    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    code, out, err = run_cli("imatrix", src, "-f", text, "-o", tmp_path / "x.gguf", "--device", "cpu")
    assert code == 1 and "needs torch" in err and len(err.strip().splitlines()) == 1
