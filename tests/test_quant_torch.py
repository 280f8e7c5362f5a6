"""Torch backend specifics: the float primitives it relies on, its degenerate-input paths,
chunking/threads/devices, and its import contract.

General byte identity over all backends is ``test_quant_bytes.py``; here the torch helpers are
checked against exact references (numpy's IEEE float32 operations, a bit-level model of
ggml's ``nearest_int``) and the whole backend against the real ggml (``tests/oracle.py``) on
inputs aimed at torch's own hazards: torch's float32 ``sqrt`` is not correctly rounded on
CPU, ``amax``/``amin`` pick an arbitrary zero sign and propagate NaN, and CUDA turns
divisions by Python floats into reciprocal multiplications.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import quant
import weights
from quant import QuantError

torch = pytest.importorskip("torch")
T = pytest.importorskip("quant._torch")
oracle = pytest.importorskip("oracle", reason="llama-cpp-python (the ggml oracle) is not installed")

TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ROOT = Path(__file__).resolve().parent.parent
F32 = np.float32


def _blocks_differ(got: np.ndarray, ref: np.ndarray, qtype: str) -> int:
    ts = quant.QTYPES[qtype].type_size
    return int((got.reshape(-1, ts) != ref.reshape(-1, ts)).any(axis=1).sum())


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=F32))


def _ggml_nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int on x86-64, bit by bit: float32 add of 1.5*2**23, low 23 bits."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = (v.astype(F32) + F32(12582912.0)).astype(F32)
    bits = s.view(np.int32)
    # x86 SSE turns inf-inf / 0*inf into the "default NaN" 0xFFC00000, whose low bits give 0
    bits = np.where(np.isnan(s), np.int32(-4194304), bits)
    return ((bits & 0x7FFFFF) - 0x400000).astype(F32)


# --------------------------------------------------------------------------------------------
# primitives


def test_devices_and_backend_names():
    devs = T.DEVICES()
    assert devs[0] == "cpu"
    assert ("cuda" in devs) == torch.cuda.is_available()
    assert "torch:cpu" in quant.available_backends()


def test_sqrt_is_correctly_rounded():
    rng = np.random.default_rng(0)
    a = np.concatenate(
        [
            (rng.random(400_000) * 10.0 ** rng.integers(-40, 38, 400_000)).astype(F32),
            np.array([0.0, 1.0, 2.0, 4.0, 1e-45, 1.17549435e-38, 3.4028235e38], dtype=F32),
            (np.arange(1, 20000, dtype=F32) ** 2),  # exact squares
            np.nextafter((np.arange(1, 20000, dtype=F32) ** 2), F32(0)),
        ]
    )
    a = a[np.isfinite(a)]
    got = T._sqrt(_t(a)).numpy()
    assert np.array_equal(got.view(np.uint32), np.sqrt(a).view(np.uint32))
    # the reason the helper exists: plain torch float32 sqrt differs somewhere (on this CPU)
    plain = torch.sqrt(_t(a)).numpy()
    print("torch.sqrt float32 values off by >= 1 ulp:", int((plain != np.sqrt(a)).sum()))


def test_nearest_int_matches_ggml_bit_trick():
    rng = np.random.default_rng(1)
    v = np.concatenate(
        [
            rng.uniform(-100, 100, 200_000),
            np.arange(-64, 64) + 0.5,  # exact ties: half to even
            [0.49999997, -0.49999997, 2.5, -2.5, 3.5, 4194303.0, -4194304.0],
            [4194304.0, 5e6, -7e6, 1e9, -3e20, 3e38, np.inf, -np.inf, np.nan],  # C asserts these away
        ]
    ).astype(F32)
    got = T._nint(_t(v)).numpy()
    assert np.array_equal(got, _ggml_nearest_int(v))
    small = np.abs(v) < 4194303
    assert np.array_equal(got[small], np.rint(v[small]))


def test_roundf_is_half_away_from_zero():
    halves = (np.arange(-260, 261) * 0.5).astype(F32)
    near = [halves]  # and every float within 8 ulps of each half-integer in [-130, 130]
    up, dn = halves.copy(), halves.copy()
    for _ in range(8):
        up = np.nextafter(up, F32(np.inf))
        dn = np.nextafter(dn, F32(-np.inf))
        near += [up, dn]
    rng = np.random.default_rng(4)
    with np.errstate(over="ignore"):
        rand = (rng.standard_normal(300_000) * 10.0 ** rng.integers(-40, 38, 300_000)).astype(F32)
    v = np.concatenate(near + [rand[np.isfinite(rand)], np.array([0.49999997, -0.49999997, -0.0, 8388607.5], F32)])
    got = T._roundf(_t(v)).numpy()
    ref = np.sign(v) * np.floor(np.abs(v).astype(np.float64) + 0.5)  # exact in float64
    assert np.array_equal(got, ref.astype(F32))


def test_first_extremes_keep_c_semantics():
    x = _t([[0.0, -0.0, 3.0], [-0.0, 0.0, -3.0], [0.0, -0.0, 1.0], [-0.0, 0.0, 3.0]])
    mn = T._first_ext(x, False).numpy()
    mx = T._first_ext(x, True).numpy()
    # min of column 0 is the first zero (+0), of column 1 the first zero (-0)
    assert np.signbit(mn[:2]).tolist() == [False, True]
    assert np.signbit(mx[:2]).tolist() == [False, True]
    assert mx[2] == 3.0 and mn[2] == -3.0
    amax, signed = T._first_absmax(x)
    assert amax[2] == 3.0 and signed[2] == 3.0  # +3 comes before -3: first one wins
    _, signed0 = T._first_absmax(_t([[-0.0], [-0.0]]))
    assert not np.signbit(signed0.numpy()[0])  # all-zero group: C's max stays +0
    _, with_nan = T._first_absmax(_t([[np.nan], [-2.0], [2.0]]), nan_safe=True)
    assert with_nan.numpy()[0] == -2.0  # NaN never wins a strict '>'


# --------------------------------------------------------------------------------------------
# whole backend against ggml on torch's hazard inputs


def _hazard_rows(n: int) -> np.ndarray:
    """Rows that hit sign-of-zero, tie, sqrt, NaN/inf-intermediate and fp16 over/underflow paths."""
    rng = np.random.default_rng(2)
    rows = []
    z = np.zeros(n, F32)
    rows.append(z.copy())
    r = z.copy()
    r[1::2] = -0.0
    rows.append(r)  # +0 first, then -0
    r = -z
    r[5::7] = 0.0
    rows.append(r)  # -0 first
    r = np.abs(rng.standard_normal(n)).astype(F32)
    r[rng.random(n) < 0.5] = -0.0
    rows.append(r)  # non-negative with signed zeros: Q5_1's min is the first zero
    for mag in (1e-45, 1e-42, 3e-39, 1e-38, 1e-30, 1e-8, 6e4, 1e6, 1e20, 1e37):
        for kind in range(3):
            r = rng.standard_normal(n)
            if kind == 1:
                r = -np.abs(r) - 2.0  # all negative, offset-heavy
            elif kind == 2:
                r[rng.random(n) < 0.8] = 0.0
            rows.append((r * mag).astype(F32))
    rows.append((rng.integers(-254, 255, n) * 0.5).astype(F32))  # Q8_0 ties at amax 127
    rows[-1][::32] = 127.0
    rows.append((rng.integers(-64, 65, n) * 0.25).astype(F32))  # K-quant ties
    r = (rng.standard_normal(n) * 1e-40).astype(F32)
    r[::37] = 1.0
    rows.append(r)  # tiny blocks next to normal ones
    r = np.full(n, 1e-3, F32)
    r[::64] = -1.0
    rows.append(r)
    rows.append(np.full(n, -0.75, F32))  # constant negative: degenerate search
    rows.append(weights.make("gaussian_f32", 8, n, seed=5)[0])
    return np.array(rows, dtype=F32)


@pytest.mark.parametrize("qtype", TYPES)
def test_hazard_inputs_match_ggml(qtype):
    n = 512
    x = _hazard_rows(n)
    assert np.isfinite(x).all()
    rng = np.random.default_rng(3)
    imats = [None]
    if quant.QTYPES[qtype].uses_imatrix:
        qw = (rng.gamma(0.5, 2.0, n) * 1e3).astype(F32)
        qw[rng.random(n) < 0.2] = 0.0
        imats += [qw, np.full(n, 1e-30, F32), np.ones(n, F32)]
    for qw in imats:
        ref = oracle.ggml_quantize(x, qtype, qw)
        got = T.quantize_rows(qtype, x, qw, device="cpu")
        bad = np.flatnonzero((got != ref).any(axis=1))
        assert bad.size == 0, f"{qtype} imatrix={qw is not None}: rows {bad.tolist()} differ from ggml"


@pytest.mark.parametrize("qtype", TYPES)
def test_realistic_weights_match_ggml(qtype):
    """A mix of the shared weight cases through the public API with backend="torch:cpu"."""
    cases = ["student_t", "outlier_columns", "zero_const_rows", "magnitudes", "rounding_ties"]
    x = np.concatenate([weights.make(c, 24, 1024, seed=11) for c in cases])
    qw = weights.imatrix(1024, seed=12)
    for im in (None, qw) if quant.QTYPES[qtype].uses_imatrix else (None,):
        got = quant.quantize(x, qtype, imatrix=im, backend="torch:cpu")
        ref = oracle.ggml_quantize(x, qtype, im)
        assert _blocks_differ(got, ref, qtype) == 0


class _ExactnessAudit(torch.overrides.TorchFunctionMode):
    """Records torch calls that would break bit-exactness on CUDA although they are exact on
    CPU: divisions involving a Python number (CUDA multiplies by a rounded reciprocal),
    reductions that reorder float sums, and fused multiply-add style ops."""

    DIV = {"div", "div_", "__truediv__", "__rtruediv__", "__itruediv__", "true_divide", "reciprocal"}
    FUSED = {"addcmul", "addcdiv", "lerp", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "cumsum", "logsumexp"}
    FLOAT_SUMS = {"sum", "mean", "nansum", "prod", "std", "var"}

    def __init__(self):
        super().__init__()
        self.bad: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        flat = list(args) + list(kwargs.values())
        if name in self.DIV and any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in flat):
            self.bad.append(f"{name} with a Python number")
        if name in self.FUSED:
            self.bad.append(name)
        if name in self.FLOAT_SUMS and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            self.bad.append(f"{name} over floats")
        return func(*args, **kwargs)


@pytest.mark.parametrize("qtype", TYPES)
def test_no_cuda_hazardous_ops(qtype):
    """Guards the CUDA rules on a CPU-only machine: every division is tensor by tensor, no
    float reductions that reorder sums, no fused ops (see the module docstring)."""
    x = np.concatenate([_hazard_rows(256)[:12], weights.make("student_t", 4, 256, seed=1)])
    qw = weights.imatrix(256, seed=2)
    audit = _ExactnessAudit()
    with audit:
        for im in (None, qw):
            T.quantize_rows(qtype, x, im, device="cpu")
    assert not audit.bad, sorted(set(audit.bad))


# --------------------------------------------------------------------------------------------
# chunking, threads, devices, errors


@pytest.mark.parametrize("qtype", ["Q5_1", "Q4_K", "Q6_K"])
def test_chunking_and_threads_do_not_change_bytes(qtype, monkeypatch):
    x = weights.make("student_t", 30, 768, seed=4)
    qw = weights.imatrix(768, seed=5)
    for im in (None, qw):
        ref = oracle.ggml_quantize(x, qtype, im)
        monkeypatch.setitem(T._CHUNK, "cpu", 768 * 4)  # 4 rows per chunk, ragged last chunk
        got = T.quantize_rows(qtype, x, im, threads=3, device="cpu")
        assert _blocks_differ(got, ref, qtype) == 0
        monkeypatch.setitem(T._CHUNK, "cpu", 1)  # one row per chunk
        assert np.array_equal(T.quantize_rows(qtype, x, im, device="cpu"), ref)


def test_threads_setting_is_restored():
    before = torch.get_num_threads()
    T.quantize_rows("Q4_K", weights.make("student_t", 8, 256), None, threads=2, device="cpu")
    assert torch.get_num_threads() == before


def test_read_only_input_is_accepted_without_warning(recwarn):
    x = weights.make("student_t", 4, 256)
    x.setflags(write=False)
    got = T.quantize_rows("Q8_0", x, None, device="cpu")
    assert np.array_equal(got, oracle.ggml_quantize(x, "Q8_0"))
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_bad_arguments_raise_quant_error():
    x = np.zeros((2, 256), F32)
    with pytest.raises(QuantError, match="unsupported type"):
        T.quantize_rows("IQ2_XXS", x, None, device="cpu")
    with pytest.raises(QuantError, match="multiple of the block size 256"):
        T.quantize_rows("Q4_K", np.zeros((2, 288), F32), None, device="cpu")
    with pytest.raises(QuantError, match=r"expected \(256,\)"):
        T.quantize_rows("Q4_K", x, np.ones(128, F32), device="cpu")
    with pytest.raises(QuantError, match="not supported"):
        T.quantize_rows("Q4_K", x, None, device="meta")
    with pytest.raises(QuantError, match="bad device"):
        T.quantize_rows("Q4_K", x, None, device="nonsense-device")
    if not torch.cuda.is_available():
        with pytest.raises(QuantError, match="CUDA was requested"):
            quant.quantize(x, "Q4_K", backend="torch:cuda")
    assert T.quantize_rows("Q6_K", np.zeros((0, 256), F32), None, device="cpu").shape == (0, 210)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("qtype", TYPES)
def test_cuda_matches_ggml(qtype):
    x = np.concatenate([_hazard_rows(512)[:, :512], weights.make("student_t", 64, 512, seed=9)])
    qw = weights.imatrix(512, seed=10)
    for im in (None, qw) if quant.QTYPES[qtype].uses_imatrix else (None,):
        got = T.quantize_rows(qtype, x, im, device="cuda")
        assert _blocks_differ(got, oracle.ggml_quantize(x, qtype, im), qtype) == 0


def test_import_without_torch_raises_import_error():
    """torch is optional: without it the module raises ImportError and the backend is absent."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import quant\n"
        "try:\n"
        "    import quant._torch\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR', e)\n"
        "print('BACKENDS', quant.available_backends())\n"
        "try:\n"
        "    quant.quantize(__import__('numpy').zeros((1, 32), 'float32'), 'Q8_0', backend='torch')\n"
        "except quant.QuantError as e:\n"
        "    print('QUANT-ERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "IMPORT-ERROR" in out and "PyTorch" in out
    backends = out.split("BACKENDS", 1)[1].splitlines()[0]
    assert "torch" not in backends and "numpy" in backends
    assert "QUANT-ERROR backend 'torch' is not available" in out
