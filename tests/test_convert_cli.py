"""``gguf-moe convert`` / ``quantize`` end to end on tiny synthetic merges.

Files are read back with gguf-py's ``GGUFReader``; quantized data is checked against the
real ggml quantizer (``tests/oracle.py``) and float data against safetensors' values.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.source import open_model
from gguf_moe.synth import make_model
from test_imatrix import write_legacy_imatrix

TYPES = ("Q4_K_M", "Q8_0", "BF16")


def run(*args: str):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Fused and legacy checkpoints of the same weights, in directories of the same name
    (general.name comes from the directory name)."""
    base = tmp_path_factory.mktemp("models")
    return {
        "fused": make_model(base / "fused" / "tiny-moe", layout="fused", seed=0),
        "legacy": make_model(base / "legacy" / "tiny-moe", layout="legacy", seed=0, shards=3),
    }


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    """Both layouts converted in one pass each to Q4_K_M, Q8_0 and BF16."""
    out = {}
    for layout, src in models.items():
        d = tmp_path_factory.mktemp(f"out-{layout}")
        r = run("convert", src, *[x for t in TYPES for x in ("-t", t.lower())], "--outdir", d, "--quiet")
        assert r.exit_code == 0, r.output
        out[layout] = d
    return out


def _reader(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def test_outdir_names_and_nothing_else(converted):
    for d in converted.values():
        assert sorted(p.name for p in d.iterdir()) == sorted([f"tiny-moe-{t}.gguf" for t in TYPES] + ["README.md"])


def test_fused_and_legacy_give_identical_files(converted):
    for t in TYPES:
        a = (converted["fused"] / f"tiny-moe-{t}.gguf").read_bytes()
        b = (converted["legacy"] / f"tiny-moe-{t}.gguf").read_bytes()
        assert a == b, t


def test_one_pass_equals_separate_runs(models, converted, tmp_path):
    for t in ("Q4_K_M", "BF16"):
        out = tmp_path / f"{t}.gguf"
        r = run("convert", models["fused"], "-t", t, "-o", out, "-q")
        assert r.exit_code == 0, r.output
        assert out.read_bytes() == (converted["fused"] / f"tiny-moe-{t}.gguf").read_bytes(), t


def test_dry_run_plan_matches_file(models, converted):
    r = run("convert", models["fused"], "-t", "Q4_K_M", "-t", "Q8_0", "--dry-run")
    assert r.exit_code == 0, r.output
    sections = {}
    cur = None
    for line in r.output.splitlines():
        if line.startswith("# "):
            cur = line.split()[1]
            sections[cur] = {}
        elif cur and line and not line.startswith("total"):
            name, *_, typ, nbytes = line.split()
            sections[cur][name] = (typ, int(nbytes))
    assert set(sections) == {"Q4_K_M", "Q8_0"}
    for t, plan in sections.items():
        rd = _reader(converted["fused"] / f"tiny-moe-{t}.gguf")
        got = {ti.name: (ti.tensor_type.name, int(ti.n_bytes)) for ti in rd.tensors}
        assert plan == got, t
        assert [ti.name for ti in rd.tensors] == list(plan)  # same order
    assert not any(Path(models["fused"]).glob("*.gguf"))


def test_bf16_file_holds_the_source_values(models, converted):
    """BF16 output of a bf16 checkpoint is exact; F32 tensors are exact too."""
    m = open_model(models["legacy"])
    rd = _reader(converted["legacy"] / "tiny-moe-BF16.gguf")
    got = {ti.name: ti for ti in rd.tensors}
    assert [ti.name for ti in rd.tensors] == [t.name for t in m.tensors]
    for st in m.tensors:
        ti = got[st.name]
        assert tuple(int(d) for d in ti.shape) == tuple(reversed(st.shape))
        data = np.asarray(ti.data)
        if ti.tensor_type == gguf.GGMLQuantizationType.BF16:
            vals = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            assert ti.tensor_type == gguf.GGMLQuantizationType.F32 and st.force_f32
            vals = data
        assert np.array_equal(vals.reshape(st.shape), st.read()), st.name


def test_quantized_tensors_match_ggml(models, converted):
    """Every quantized tensor's bytes equal ggml_quantize_chunk on the same rows."""
    oracle = pytest.importorskip("oracle")
    m = open_model(models["fused"])
    src = {t.name: t for t in m.tensors}
    for t in ("Q4_K_M", "Q8_0"):
        rd = _reader(converted["fused"] / f"tiny-moe-{t}.gguf")
        for ti in rd.tensors:
            if ti.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16):
                continue
            x = src[ti.name].read().reshape(-1, src[ti.name].shape[-1])
            want = oracle.ggml_quantize(x, ti.tensor_type.name)
            assert np.array_equal(np.asarray(ti.data).reshape(want.shape), want), (t, ti.name)


def test_metadata(models, converted):
    rd = _reader(converted["fused"] / "tiny-moe-Q4_K_M.gguf")
    f = rd.fields
    keys = list(f)
    val = lambda k: f[k].contents()  # noqa: E731
    # general.name as llama.cpp's converter derives it (gguf-py Metadata, from the directory name)
    assert val("general.architecture") == "llama"
    assert val("general.name") == gguf.Metadata.load(None, models["fused"], None, 1).name == "Tiny Moe"
    assert val("general.size_label").startswith("4x")
    assert val("llama.expert_count") == 4 and val("llama.expert_used_count") == 2
    assert val("llama.block_count") == 2 and val("llama.rope.dimension_count") == 64
    assert val("llama.rope.freq_base") == 1e6
    # recipe
    assert val("moe.gate_mode") == "hidden"
    assert val("moe.expert.3.source_model") == val("moe.expert.0.source_model")  # duplicated expert
    assert isinstance(val("moe.expert.0.positive_prompts"), list)
    assert val("general.base_model.count") == 4
    # llama-quantize's KV order: quantization_version and file_type last
    assert keys[-2:] == ["general.quantization_version", "general.file_type"]
    assert val("general.file_type") == 15
    bf = _reader(converted["fused"] / "tiny-moe-BF16.gguf").fields
    bkeys = list(bf)
    assert bkeys.index("general.file_type") < bkeys.index("llama.vocab_size") < bkeys.index("general.quantization_version")
    assert bf["general.file_type"].contents() == 32
    assert any(k.startswith("tokenizer.ggml.") for k in bkeys)


def test_no_recipe_flag(models, tmp_path):
    out = tmp_path / "x.gguf"
    assert run("convert", models["fused"], "-t", "BF16", "-o", out, "-q", "--no-recipe").exit_code == 0
    keys = list(_reader(out).fields)
    assert not any(k.startswith(("moe.", "general.base_model")) for k in keys)


def test_quantize_command_equals_direct_conversion(converted, tmp_path):
    """GGUF -> GGUF from the BF16 file gives the same bytes as converting straight to Q4_K_M."""
    bf16 = converted["fused"] / "tiny-moe-BF16.gguf"
    out = tmp_path / "q.gguf"
    r = run("quantize", bf16, out, "q4_k_m", "-q")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == (converted["fused"] / "tiny-moe-Q4_K_M.gguf").read_bytes()


def test_quantize_refuses_quantized_input(converted, tmp_path):
    r = CliRunner().invoke(main, ["quantize", str(converted["fused"] / "tiny-moe-Q8_0.gguf"), str(tmp_path / "y.gguf"), "Q4_K_M"])
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and "already Q8_0" in r.stderr and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, msg",
    [
        (["-t", "Q4_K_M", "-t", "Q8_0", "-o", "x.gguf"], "-o/--output takes one -t"),
        (["-t", "Q4_K_M"], "give -o OUT.gguf"),
        (["-t", "Q3_K_XL", "-o", "x.gguf"], "unknown output type"),
        (["-o", "x.gguf"], "Missing option"),
        (["-t", "Q8_0", "-o", "x.gguf", "--outdir", "d"], "not both"),
    ],
)
def test_usage_errors_exit_2(models, args, msg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["convert", str(models["fused"]), *args])
    assert r.exit_code == 2, r.output
    assert msg in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_python_dash_m_and_help():
    r = subprocess.run([sys.executable, "-m", "gguf_moe", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "convert" in r.stdout and "quantize" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gguf_moe", "convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--dry-run" in r.stdout


def test_force_overwrites(models, tmp_path):
    out = tmp_path / "a.gguf"
    out.write_bytes(b"old")
    r = CliRunner().invoke(main, ["convert", str(models["fused"]), "-t", "Q8_0", "-o", str(out), "-q"])
    assert r.exit_code == 1 and "already exists" in r.stderr and out.read_bytes() == b"old"
    r = CliRunner().invoke(main, ["convert", str(models["fused"]), "-t", "Q8_0", "-o", str(out), "-q", "--force"])
    assert r.exit_code == 0 and out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]


def test_resident_memory_does_not_follow_model_size(tmp_path):
    """Converting a ~100 MB checkpoint raises peak RSS by far less than its size: mapped
    pages are released after each chunk (without that, RSS grows by the whole model)."""
    src = make_model(tmp_path / "mid-moe", layout="fused", n_layer=2, hidden=1024, ff=2048, n_head=8, n_kv_head=4, seed=4)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert size > 90e6
    # VmHWM (not ru_maxrss, which Linux carries over from the forking process) after
    # resetting it with clear_refs once the code paths are warm.
    script = f"""
from pathlib import Path
from gguf_moe.source import open_model
from gguf_moe.convert import plan_outputs, convert
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
def run(name):
    with open_model({str(src)!r}) as m:
        plans = plan_outputs(m, ["BF16"], [Path({str(tmp_path)!r}) / name])
        convert(m, plans, chunk_bytes=1 << 20)
run("warm.gguf")
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
run("a.gguf")
print(base, status("VmHWM"))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    base, peak = (int(x) for x in r.stdout.split())
    assert peak - base < 40e6, (base, peak, size)


def test_imatrix_matches_ggml_per_expert(models, converted, tmp_path):
    """With --imatrix every quantized tensor equals ggml_quantize_chunk given llama-quantize's
    quant_weights (the expert's slice for *_exps); quantize from BF16 gives the same file."""
    oracle = pytest.importorskip("oracle")
    m = open_model(models["fused"])
    rng = np.random.default_rng(7)
    entries = {}
    for st in m.tensors:
        if len(st.shape) >= 2 and not st.force_f32 and st.name != "token_embd.weight":
            n_mat = st.shape[0] if len(st.shape) == 3 else 1
            entries[st.name] = rng.gamma(2.0, 1.0, size=n_mat * st.shape[-1]).astype(np.float32)
    imf = tmp_path / "imatrix.dat"
    write_legacy_imatrix(imf, {name: (vals, 1) for name, vals in entries.items()})
    out = tmp_path / "im.gguf"
    r = run("convert", models["fused"], "-t", "Q4_K_M", "-o", out, "--imatrix", imf, "-q")
    assert r.exit_code == 0, r.output
    rd = _reader(out)
    src = {t.name: t for t in m.tensors}
    n_checked = 0
    for ti in rd.tensors:
        if ti.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16):
            continue
        st = src[ti.name]
        x = st.read()
        got = np.asarray(ti.data)
        w = entries.get(ti.name)
        if len(st.shape) == 3:
            for e in range(st.shape[0]):
                qw = None if w is None else w.reshape(st.shape[0], -1)[e]
                want = oracle.ggml_quantize(x[e], ti.tensor_type.name, imatrix=qw)
                assert np.array_equal(got.reshape(st.shape[0], *want.shape)[e], want), (ti.name, e)
        else:
            want = oracle.ggml_quantize(x, ti.tensor_type.name, imatrix=w)
            assert np.array_equal(got.reshape(want.shape), want), ti.name
        n_checked += 1
    assert n_checked >= 15
    plain = (converted["fused"] / "tiny-moe-Q4_K_M.gguf").read_bytes()
    assert out.read_bytes() != plain  # the imatrix changed the data
    keys = list(rd.fields)
    assert keys[-4:] == [
        "general.quantization_version", "general.file_type", "quantize.imatrix.file", "quantize.imatrix.entries_count"
    ]  # fmt: skip
    assert rd.fields["quantize.imatrix.entries_count"].contents() == len(entries)
    out2 = tmp_path / "im2.gguf"
    r = run("quantize", converted["fused"] / "tiny-moe-BF16.gguf", out2, "Q4_K_M", "--imatrix", imf, "-q")
    assert r.exit_code == 0, r.output
    assert out2.read_bytes() == out.read_bytes()


def test_demo_command(tmp_path):
    """The demo builds the model, writes six files in one pass and validates each."""
    r = run("demo", tmp_path / "demo", "-q")
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "demo").glob("*.gguf"))
    assert names == sorted(f"tiny-frankenmoe-{t}.gguf" for t in ("IQ4_XS", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q8_0", "BF16"))
    assert r.stdout.count("ok: ") == 6 and "same bytes" in r.stdout
    rd = _reader(tmp_path / "demo" / "tiny-frankenmoe-Q5_K_M.gguf")
    assert rd.fields["general.file_type"].contents() == 17 and rd.fields["llama.expert_count"].contents() == 4
    card = (tmp_path / "demo" / "README.md").read_text()  # the model card, as convert --outdir writes it
    assert card.startswith("---\nbase_model: tiny-frankenmoe\n") and all(f"`{n}`" in card for n in names)
