"""iqk_jax.testing: the quality metric and the random-row helper every test relies on."""

import numpy as np
import pytest

import iqk_jax
from iqk_jax import spec, testing

from conftest import SETS, VARIANTS, needs_conformance, vectors


@needs_conformance
@pytest.mark.parametrize("name", iqk_jax.types())
def test_weighted_rmse_is_the_manifest_formula(name, manifest, inputs):
    """Recomputed from ik's own floats, it gives the manifest's numbers: the quantizer quality
    bars compare like with like."""
    vec = vectors(name)
    for s in SETS:
        for v in VARIANTS:
            w = inputs[f"{s}.imatrix"] if v == "imatrix" else np.ones(inputs[s].shape[1])
            got = testing.weighted_rmse(inputs[s], vec[f"{s}.{v}.deq"], w)
            want = manifest["types"][name]["cases"][f"{s}.{v}"]["weighted_rmse"]
            assert got == pytest.approx(want, rel=1e-6), (name, s, v, got, want)


@pytest.mark.parametrize("name", iqk_jax.types())
def test_random_rows_decode_to_finite_values(name):
    raw = testing.random_rows(name, 3, 512, seed=1)
    assert raw.shape == (3, iqk_jax.row_bytes(name, 512))
    y = spec.dequantize(raw, name, 512)
    d = iqk_jax.descriptor(name)
    # |d| <= 0.1 (rounded up through the header dtype) times the largest scale and grid value.
    bound = (float(np.float32(0.1)) * 1.001 * np.abs(d.scale_lut).max()
             * np.abs(d.grid_values).max())
    assert np.isfinite(y).all() and np.abs(y).max() <= bound
