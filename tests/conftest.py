"""Shared fixtures: the ik_llama.cpp conformance vectors in ../shared/conformance."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFORMANCE = pathlib.Path(os.environ.get("IQK_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
SETS = ("gaussian", "heavy", "edge", "real")
VARIANTS = ("plain", "imatrix")


def conformance_available() -> bool:
    return (CONFORMANCE / "manifest.json").is_file()


needs_conformance = pytest.mark.skipif(
    not conformance_available(), reason=f"conformance vectors not found at {CONFORMANCE}")


@pytest.fixture(scope="session")
def manifest():
    if not conformance_available():
        pytest.skip(f"conformance vectors not found at {CONFORMANCE}")
    return json.loads((CONFORMANCE / "manifest.json").read_text())


@pytest.fixture(scope="session")
def inputs():
    if not conformance_available():
        pytest.skip(f"conformance vectors not found at {CONFORMANCE}")
    with np.load(CONFORMANCE / "inputs.npz") as z:
        return {k: z[k] for k in z.files}


_VECTORS: dict[str, dict[str, np.ndarray]] = {}


def vectors(type_name: str) -> dict[str, np.ndarray]:
    """ik_llama.cpp's bytes and floats for one type (cached per session)."""
    if not conformance_available():
        pytest.skip(f"conformance vectors not found at {CONFORMANCE}")
    if type_name not in _VECTORS:
        path = CONFORMANCE / f"{type_name}.npz"
        if not path.is_file():
            pytest.skip(f"no conformance vectors for {type_name}")
        with np.load(path) as z:
            _VECTORS[type_name] = {k: z[k] for k in z.files}
    return _VECTORS[type_name]
