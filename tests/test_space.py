"""Disk space: the preflight knows every output's exact size and stops before any work; a
disk that fills anyway gives one line naming the file and ENOSPC, and nothing is left.

On a small tmpfs when the test may mount one (root, and a kernel that allows it); the
mid-write failure is also checked with a fault-injected write everywhere.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_moe.cli import main
from gguf_moe.synth import make_model


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("src") / "Space-MoE-4x", seed=31)


@pytest.fixture(scope="module")
def sizes(model, tmp_path_factory) -> dict[str, int]:
    """Real sizes of the outputs (written where there is room)."""
    d = tmp_path_factory.mktemp("full")
    r = run("convert", model, "-t", "BF16", "-t", "Q4_K_M", "--outdir", d, "-q", "--no-card")
    assert r.exit_code == 0, r.output
    return {p.name: p.stat().st_size for p in d.iterdir()}


@pytest.fixture()
def small_fs(tmp_path):
    """A 6 MB tmpfs (the BF16 output is about 8 MB, Q4_K_M about 2.5 MB)."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the fault-injected test covers ENOSPC")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


def test_planned_sizes_are_exact(model, sizes, tmp_path):
    """What the preflight adds up is each file's exact size (single files and split sets)."""
    from gguf_moe import convert as conv
    from gguf_moe.source import open_model
    from gguf_moe.split import SplitSpec, open_output

    with open_model(model) as m:
        plans = conv.plan_outputs(m, ["BF16", "Q4_K_M"], [tmp_path / f"Space-MoE-4x-{t}.gguf" for t in ("BF16", "Q4_K_M")])
        for o in plans:
            (path, n), = open_output(o.path, conv.make_writer(m, o)).planned()
            assert n == sizes[path.name]
            shards = open_output(o.path, conv.make_writer(m, o), split=SplitSpec(max_bytes=1_000_000)).planned()
            d = tmp_path / o.preset.name
            d.mkdir()
            r = run("convert", model, "-t", o.preset.name, "-o", d / o.path.name, "-q", "--split-max-size", "1M")
            assert r.exit_code == 0, r.output
            assert [(p.name, n) for p, n in shards] == sorted((p.name, p.stat().st_size) for p in d.iterdir())


def test_preflight_stops_before_any_work(model, sizes, small_fs):
    r = run("convert", model, "-t", "BF16", "-t", "Q4_K_M", "--outdir", small_fs / "out")
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    need = sizes["Space-MoE-4x-BF16.gguf"] + sizes["Space-MoE-4x-Q4_K_M.gguf"]
    from gguf_moe.space import fmt_size

    assert len(lines) == 1 and lines[0].startswith(f"error: needs {fmt_size(need)} in {small_fs / 'out'}/, "), lines
    assert "free" in lines[0] and "--no-space-check" in lines[0]
    assert not (small_fs / "out").exists() or not list((small_fs / "out").iterdir())
    # what fits is written
    r = run("convert", model, "-t", "Q4_K_M", "--outdir", small_fs / "out", "-q", "--no-card")
    assert r.exit_code == 0, r.output


def test_preflight_for_quantize(model, sizes, small_fs, tmp_path):
    src = tmp_path / "f32.gguf"
    assert run("convert", model, "-t", "F32", "-o", src, "-q").exit_code == 0
    r = run("quantize", src, small_fs / "x.gguf", "BF16")
    assert r.exit_code == 1 and r.output.startswith("error: needs ") and r.output.count("\n") == 1, r.output
    assert not list(small_fs.iterdir())


@pytest.mark.parametrize("split", [(), ("--split-max-size", "1M")])
def test_disk_full_mid_write_on_tmpfs(model, small_fs, split):
    out = small_fs / "out"
    out.mkdir()
    r = run("convert", model, "-t", "BF16", "-t", "Q4_K_M", "--outdir", out, "--no-space-check", *split)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    assert "no space left on device (ENOSPC)" in lines[0] and "Space-MoE-4x-" in lines[0], lines
    assert lines[0].startswith(f"error: {out}/Space-MoE-4x-")
    assert not list(out.iterdir()), "partial files were left behind"
    st = os.statvfs(small_fs)
    assert st.f_bfree == st.f_blocks  # and the space is free again


@pytest.mark.parametrize("split", [(), ("--split-max-size", "1M")])
def test_disk_full_mid_write_fault_injected(model, tmp_path, monkeypatch, split):
    """The same on any filesystem: the output file's writes fail with ENOSPC after 3 MB."""
    import io

    real_open = open
    limit = 3_000_000

    class Full(io.FileIO):
        written = 0

        def write(self, b):
            n = memoryview(b).nbytes
            if Full.written + n > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            Full.written += n
            return super().write(b)

    def fake_open(file, mode="r", *a, **k):
        if "w" in mode and str(file).endswith(".part"):
            return io.BufferedWriter(Full(file, "w"))
        return real_open(file, mode, *a, **k)

    import gguf.gguf_writer

    monkeypatch.setattr(gguf.gguf_writer, "open", fake_open, raising=False)
    out = tmp_path / "out"
    out.mkdir()
    r = run("convert", model, "-t", "BF16", "--outdir", out, "--no-space-check", "--no-card", *split)
    assert r.exit_code == 1, r.output
    assert Full.written > 0, "the injected writer was not used"
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "ENOSPC" in lines[0] and lines[0].startswith(f"error: {out}/Space-MoE-4x-BF16"), lines
    assert not list(out.iterdir())
