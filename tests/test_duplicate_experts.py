"""Duplicated experts are encoded once, and the files stay llama.cpp's.

Merges reuse one source model for several experts.  ``convert`` and ``quantize`` fingerprint
each chunk of a stacked-expert tensor (a few of its rows and its importance weights) as it
streams, compare a chunk whose fingerprint repeats byte for byte with the earlier chunk's
source rows, and copy the bytes already written for an identical chunk instead of encoding
it again.
Here the encoder is counted, rows per tensor and type, to show that:

* the duplicated expert of a merge is encoded once (``convert`` with one chunk or several
  per expert, and ``quantize`` from a BF16 GGUF);
* it is encoded again when its bytes differ from the other expert's by one value, or when
  the imatrix gives the two experts different importance weights;

and every file is compared, byte for byte, with the real ``llama_model_quantize``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gguf_moe.convert as conv
import gguf_moe.quantize as qz
from gguf_moe.cli import main
from gguf_moe.imatrix import load_imatrix
from gguf_moe.options import Options, Progress
from gguf_moe.presets import PRESETS
from gguf_moe.source import open_model
from gguf_moe.synth import make_model
from gguf_moe.validate import read_header
from oracle import llama_model_quantize
from test_imatrix import write_gguf_imatrix

N_EXPERT, FF, HIDDEN = 4, 512, 256
EXPS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
#: rows of one expert slice of each expert tensor
PER = {"ffn_gate_exps": FF, "ffn_up_exps": FF, "ffn_down_exps": HIDDEN}


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def cli(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


class Counting(Progress):
    """Rows encoded per (tensor, ggml type): the progress hooks name the tensor, the
    encoder (patched) counts the rows."""

    def __init__(self):
        self.name = ""
        self.rows: Counter = Counter()

    def tensor(self, name: str, index: int) -> None:
        self.name = name

    def exps(self, type_name: str) -> dict[str, int]:
        """Rows encoded as ``type_name`` for each expert tensor of layer 0."""
        return {k: self.rows[(f"blk.0.{k}.weight", type_name)] for k in EXPS}


@pytest.fixture
def counting(monkeypatch) -> Counting:
    prog = Counting()
    real = conv.encode

    def encode(x, t, **kw):
        prog.rows[(prog.name, t.name)] += len(x)
        return real(x, t, **kw)

    monkeypatch.setattr(conv, "encode", encode)
    monkeypatch.setattr(qz, "encode", encode)
    return prog


def _perturb_one_value(model_dir: Path, tensor: str, index: int) -> None:
    """Flip the lowest mantissa bit of one bf16 value of ``tensor`` in its shard."""
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "r+b") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            hdr = json.loads(fh.read(n))
            if tensor not in hdr:
                continue
            assert hdr[tensor]["dtype"] == "BF16"
            pos = 8 + n + hdr[tensor]["data_offsets"][0] + 2 * index
            fh.seek(pos)
            (v,) = struct.unpack("<H", fh.read(2))
            fh.seek(pos)
            fh.write(struct.pack("<H", v ^ 1))
            return
    raise AssertionError(f"{tensor} not found")


@pytest.fixture(scope="module")
def merge(tmp_path_factory):
    """A 4-expert legacy merge whose last expert is a copy of expert 0, its BF16 GGUF, and
    llama-quantize's Q4_K_M and Q5_K_M of that file."""
    d = tmp_path_factory.mktemp("dup")
    src = make_model(d / "m", layout="legacy", n_layer=1, n_expert=N_EXPERT, hidden=HIDDEN, ff=FF,
                     duplicate_expert=True, seed=41)  # fmt: skip
    bf16 = d / "m-BF16.gguf"
    cli("convert", src, "-t", "BF16", "-o", bf16, "-q")
    ref = {}
    for p in ("Q4_K_M", "Q5_K_M"):
        ref[p] = d / f"ref-{p}.gguf"
        llama_model_quantize(bf16, ref[p], PRESETS[p].file_type)
    return src, bf16, ref


def _convert(src: Path, outdir: Path, presets, prog: Counting, **kw) -> list:
    model = open_model(src)
    try:
        opts = Options(progress=prog, **kw)
        plans = conv.plan_outputs(model, presets, [outdir / f"{p}.gguf" for p in presets], opts)
        conv.convert(model, plans, opts)
    finally:
        model.close()
    return plans


@pytest.mark.parametrize("chunk_bytes", [conv.DEFAULT_CHUNK_BYTES, 64 << 10], ids=["one-chunk", "8-chunks"])
def test_convert_encodes_the_duplicated_expert_once(merge, tmp_path, counting, chunk_bytes):
    src, _, ref = merge
    plans = _convert(src, tmp_path, ["Q4_K_M", "Q5_K_M"], counting, chunk_bytes=chunk_bytes)
    for o in plans:
        p = o.preset.name
        assert sha256(o.path) == sha256(ref[p]), p
        # three of the four experts of each expert tensor were encoded, for each type in use
        for k in EXPS:
            t = {t.name: t.ggml_type.name for t in o.tensors}[f"blk.0.{k}.weight"]
            assert counting.rows[(f"blk.0.{k}.weight", t)] == (N_EXPERT - 1) * PER[k], (p, k, t)
        assert o.reused_experts == len(EXPS)


def test_quantize_encodes_the_duplicated_expert_once(merge, tmp_path, counting):
    _, bf16, ref = merge
    opts = Options(progress=counting)
    plan = qz.plan_quantize(bf16, "Q4_K_M", tmp_path / "q.gguf", opts)
    qz.write_quantize(plan, opts)
    assert sha256(tmp_path / "q.gguf") == sha256(ref["Q4_K_M"])
    types = {t.name: t.ggml_type.name for t in plan.tensors}
    for k in EXPS:
        assert counting.rows[(f"blk.0.{k}.weight", types[f"blk.0.{k}.weight"])] == (N_EXPERT - 1) * PER[k], k
    assert plan.reused_experts == len(EXPS)


def test_one_value_apart_is_encoded_again(merge, tmp_path, counting):
    """Expert 3 of ffn_gate differs from expert 0 in one bf16 value (its last bit, in row 4,
    which the fingerprint does not sample: the byte comparison decides): it is encoded;
    ffn_up and ffn_down are still copied.  Same bytes as llama-quantize."""
    src0, _, _ = merge
    src = tmp_path / "m1"
    shutil.copytree(src0, src)
    _perturb_one_value(src, "model.layers.0.block_sparse_moe.experts.3.w1.weight", 1234)
    bf16 = tmp_path / "m1-BF16.gguf"
    cli("convert", src, "-t", "BF16", "-o", bf16, "-q")
    ref = tmp_path / "ref.gguf"
    llama_model_quantize(bf16, ref, PRESETS["Q4_K_M"].file_type)
    out = tmp_path / "out"
    out.mkdir()
    (plan,) = _convert(src, out, ["Q4_K_M"], counting)
    assert sha256(plan.path) == sha256(ref)
    types = {t.name: t.ggml_type.name for t in plan.tensors}
    enc = {k: counting.rows[(f"blk.0.{k}.weight", types[f"blk.0.{k}.weight"])] for k in EXPS}
    assert enc == {"ffn_gate_exps": N_EXPERT * FF, "ffn_up_exps": (N_EXPERT - 1) * FF,
                   "ffn_down_exps": (N_EXPERT - 1) * HIDDEN}  # fmt: skip
    assert plan.reused_experts == 2


def _imatrix(bf16: Path, path: Path, *, same: set[str], seed: int) -> dict[str, np.ndarray]:
    """An imatrix file for ``bf16``'s matrices; in the expert tensors named in ``same`` the
    last expert has expert 0's weights, elsewhere every expert has its own.  Returns the
    weights as llama-quantize passes them."""
    rng = np.random.default_rng(seed)
    entries, weights = {}, {}
    for t in read_header(bf16).tensors:
        if len(t.ne) < 2 or "norm" in t.name or "ffn_gate_inp" in t.name:
            continue
        n_mat = t.ne[2] if len(t.ne) == 3 else 1
        sums = rng.gamma(0.8, 2.0, size=(n_mat, t.ne[0])).astype(np.float32)
        counts = rng.integers(1, 4000, size=n_mat).astype(np.float32)
        if n_mat > 1 and any(f".{k}." in t.name for k in same):
            sums[-1], counts[-1] = sums[0], counts[0]
        entries[t.name] = (sums, counts)
        weights[t.name] = (sums / counts[:, None]).astype(np.float32)
    write_gguf_imatrix(path, entries)
    return weights


def test_different_importance_weights_are_encoded_again(merge, tmp_path, counting):
    """With an imatrix the copy is made only where the two experts' weights are the same
    too: here ffn_up's last expert has expert 0's weights, ffn_gate's and ffn_down's do not.
    Same bytes as llama-quantize with those weights."""
    src, bf16, _ = merge
    weights = _imatrix(bf16, tmp_path / "im.gguf", same={"ffn_up_exps"}, seed=7)
    ref = tmp_path / "ref.gguf"
    llama_model_quantize(bf16, ref, PRESETS["Q4_K_M"].file_type, imatrix=weights)
    out = tmp_path / "out"
    out.mkdir()
    (plan,) = _convert(src, out, ["Q4_K_M"], counting, imatrix=load_imatrix(tmp_path / "im.gguf"))
    # (the KVs name the imatrix file: compare the tensor data)
    a, b = read_header(plan.path), read_header(ref)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    da, db = plan.path.read_bytes(), ref.read_bytes()
    for ta, tb in zip(a.tensors, b.tensors):
        assert (ta.type_id, ta.ne) == (tb.type_id, tb.ne), ta.name
        sa, sb = a.data_offset + ta.offset, b.data_offset + tb.offset
        assert da[sa : sa + ta.n_bytes] == db[sb : sb + tb.n_bytes], ta.name
    types = {t.name: t.ggml_type.name for t in plan.tensors}
    enc = {k: counting.rows[(f"blk.0.{k}.weight", types[f"blk.0.{k}.weight"])] for k in EXPS}
    assert enc == {"ffn_gate_exps": N_EXPERT * FF, "ffn_up_exps": (N_EXPERT - 1) * FF,
                   "ffn_down_exps": N_EXPERT * HIDDEN}  # fmt: skip
    assert plan.reused_experts == 1


def test_summary_and_dry_run_say_so(merge, tmp_path):
    src, bf16, _ = merge
    dry = cli("convert", src, "-t", "Q4_K_M", "--dry-run")
    assert "duplicated experts: found while writing (a dry run reads no tensor data)" in dry
    assert "duplicated experts" not in cli("convert", src, "-t", "BF16", "--dry-run")
    out = cli("convert", src, "-t", "Q4_K_M", "-t", "BF16", "--outdir", tmp_path / "o")
    lines = {ln.split(" (")[1].split(",")[0]: ln for ln in out.splitlines() if ln.startswith("wrote") and ".gguf" in ln}
    assert "3 duplicated expert slices copied, not encoded again" in lines["Q4_K_M"]
    assert "duplicated" not in lines["BF16"]
    out = cli("quantize", bf16, tmp_path / "q.gguf", "Q5_K_M")
    assert "3 duplicated expert slices copied, not encoded again" in out
