"""Smoke tests of the CPU benchmark scripts (tiny shapes): they run and report what they say."""

import importlib.util
import json
import pathlib

import pytest

from iqk_codegen import llvm as llvm_target

ROOT = pathlib.Path(__file__).resolve().parents[2] / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Done:
    def block_until_ready(self):
        return self


def test_paired_ratio_takes_block_minima():
    bench = _load("bench_cpu")
    calls = []

    def make(label, seconds):
        def fn():
            calls.append(label)
            import time
            time.sleep(seconds)
            return _Done()
        return fn

    r = bench._paired(make("a", 0.004), make("b", 0.001), reps=3, block=2)
    # Warm-up (a, b, a, b), then per rep two calls of each, base first.
    assert calls[:4] == ["a", "b", "a", "b"]
    assert calls[4:8] == ["a", "a", "b", "b"] and len(calls) == 4 + 3 * 4
    assert r["ratio_p10"] <= r["ratio"] <= r["ratio_p90"]
    assert 2.0 < r["ratio"] < 8.0  # ~4x: base sleeps 4 ms, ours 1 ms


@pytest.mark.skipif(not llvm_target.available(), reason="llvm target unavailable here")
def test_bench_cpu_writes_json(tmp_path, monkeypatch):
    bench = _load("bench_cpu")
    # main() sets the thread budget in the environment; restore it after the test.
    monkeypatch.setenv("IQK_JAX_CPU_THREADS", "1")
    out = tmp_path / "bench.json"
    bench.main(["--types", "iq4_k,iq2_ks", "--reps", "1", "--gemv-shape", "64x256",
                "--gemm-shape", "64x256x9", "--threads", "1", "--json", str(out)])
    res = json.loads(out.read_text())["results"]
    assert [(r["kernel"], r["type"]) for r in res] == [
        ("gemv", "iq4_k"), ("gemv", "iq2_ks"), ("gemm", "iq4_k"), ("gemm", "iq2_ks")]
    assert res[2]["shape"] == [64, 256, 9]
    assert all(r["ratio"] > 0 and r["ours_ms"] > 0 and r["xla_ms"] > 0 for r in res)


@pytest.mark.skipif(not (llvm_target.available() and llvm_target.host().avx2),
                    reason="needs the llvm target on an AVX2 CPU")
def test_cpu_throughput_runs(capsys):
    _load("cpu_throughput").main(["--steps", "20000"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["fma", "maddubs+maddwd", "psign+maddubs+maddwd"]
    assert lines[0].endswith("1.00x FMA's multiply-adds per cycle")
