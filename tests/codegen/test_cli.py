"""iqk-codegen: ``list`` and ``emit`` (deterministic, per target, with clear errors)."""

import pathlib
import subprocess
import sys

import pytest
from absl import app

from iqk_jax import registry
from iqk_codegen import cli, targets

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_list_prints_every_type_with_its_numbers():
    lines = cli.list_text().splitlines()
    assert lines[0].split() == ["name", "id", "bits", "block", "grids", "bpw"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert tuple(rows) == registry.types()
    for name, cols in rows.items():
        d = registry.descriptor(name)
        assert int(cols[1]) == d.ggml_type and int(cols[2]) == d.bits
        assert int(cols[3]) == d.block_size
        assert cols[4] == ("trellis" if d.trellis else str(len(d.grids)))
        assert float(cols[5]) == pytest.approx(d.bpw, abs=1e-4)


@pytest.mark.parametrize("target", targets.available())
@pytest.mark.parametrize("kernel", ["dequant", "gemv"])
def test_emit_is_deterministic(target, kernel):
    a = cli.emit_text("iq3_ks", target, kernel)
    b = cli.emit_text("IQ3_KS", target, kernel)
    assert a == b and a.endswith("\n") and len(a) > 200
    assert a != cli.emit_text("iq2_ks", target, kernel)  # the type shapes the kernel


def test_emit_errors_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="unknown IQK type 'iq9_k'"):
        cli.emit_text("iq9_k", "xla", "gemv")
    with pytest.raises(ValueError, match="unknown target 'cuda'"):
        cli.emit_text("iq4_k", "cuda", "gemv")
    with pytest.raises(ValueError, match="unknown kernel|no kernel"):
        cli.emit_text("iq4_k", "xla", "conv")
    monkeypatch.setitem(targets._TARGETS, "llvm",
                        targets.Target("llvm", "iqk_codegen._no_such_module"))
    with pytest.raises(RuntimeError, match="'llvm' is not available"):
        cli.emit_text("iq4_k", "llvm", "gemv")


def test_main_rejects_unknown_commands():
    with pytest.raises(app.UsageError, match="expected one command"):
        cli.main(["iqk-codegen", "build"])
    with pytest.raises(app.UsageError, match="expected one command"):
        cli.main(["iqk-codegen"])


def test_command_line_emit_to_file_matches_library(tmp_path):
    out = tmp_path / "k.mlir"
    cmd = [sys.executable, "-m", "iqk_codegen.cli", "emit", "--type=iq2_k", "--target=xla",
           "--kernel=gemm", f"--out={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == cli.emit_text("iq2_k", "xla", "gemm")
    r = subprocess.run([sys.executable, "-m", "iqk_codegen.cli", "list"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == cli.list_text()
    r = subprocess.run([sys.executable, "-m", "iqk_codegen.cli", "emit", "--type=iq2_k",
                        "--target=cuda"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "unknown target 'cuda'" in r.stderr
