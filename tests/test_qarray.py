"""QArray: validation and pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iqk_jax
from iqk_jax.qarray import QArray


@pytest.mark.parametrize("name", iqk_jax.types())
def test_construct_and_flatten(name):
    rb = iqk_jax.row_bytes(name, 512)
    q = QArray(np.zeros((3, rb), np.uint8), name, (3, 512))
    leaves, tree = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 1 and leaves[0].shape == (3, rb)
    q2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert (q2.type, q2.shape) == (name, (3, 512))
    assert q.bpw == pytest.approx(8 * rb / 512)


def test_passes_through_jit():
    rb = iqk_jax.row_bytes("iq4_k", 256)
    q = QArray(jnp.ones((2, rb), jnp.uint8), "iq4_k", (2, 256))

    @jax.jit
    def f(q):
        return q.raw.astype(jnp.int32).sum() + q.shape[1]

    assert int(f(q)) == 2 * rb + 256


@pytest.mark.parametrize("raw_shape,shape,exc,match", [
    ((2, 100), (2, 256), ValueError, "needs"),
    ((3, 144), (2, 256), ValueError, "needs"),
    ((2, 144), (2, 200), ValueError, "multiple of 256"),
    ((2, 144), (512,), ValueError, "rows, n_per_row"),
])
def test_validation(raw_shape, shape, exc, match):
    with pytest.raises(exc, match=match):
        QArray(np.zeros(raw_shape, np.uint8), "iq4_k", shape)


def test_dtype_and_type_validation():
    with pytest.raises(TypeError, match="uint8"):
        QArray(np.zeros((2, 144), np.int32), "iq4_k", (2, 256))
    with pytest.raises(ValueError, match="unknown IQK type"):
        QArray(np.zeros((2, 144), np.uint8), "q4_k", (2, 256))


def test_stacked_experts():
    rb = iqk_jax.row_bytes("iq4_ks", 256)
    q = QArray(np.zeros((4, 3, rb), np.uint8), "iq4_ks", (4, 3, 256))
    assert q.dequantize_np().shape == (4, 3, 256)
