"""The type registry: ids, sizes, bpw and descriptor validation."""

import dataclasses

import numpy as np
import pytest

import iqk_jax
from iqk_jax import registry
from iqk_jax.registry import Piece, TypeDescriptor

from conftest import needs_conformance

# ik_llama.cpp's ggml type ids; the GGUF files depend on them.
EXPECTED_IDS = {
    "iq2_k": 137, "iq3_k": 138, "iq4_k": 139, "iq5_k": 140, "iq6_k": 141, "iq4_ks": 144,
    "iq2_ks": 145, "iq4_kss": 146, "iq5_ks": 152, "iq2_kt": 153, "iq3_kt": 154, "iq4_kt": 155,
    "iq3_ks": 156, "iq2_kl": 157, "iq1_kt": 158,
}


def test_all_fifteen_types_with_their_ids():
    assert {t: iqk_jax.descriptor(t).ggml_type for t in iqk_jax.types()} == EXPECTED_IDS


@pytest.mark.parametrize("name", iqk_jax.types())
def test_lookup_by_name_and_id(name):
    d = iqk_jax.descriptor(name)
    assert d.name == name
    assert iqk_jax.descriptor(d.ggml_type) is d
    assert iqk_jax.descriptor(name.upper()) is d


@needs_conformance
@pytest.mark.parametrize("name", iqk_jax.types())
def test_sizes_match_ik_llama(name, manifest):
    m = manifest["types"][name]
    d = iqk_jax.descriptor(name)
    assert d.row_header_bytes == m["row_meta_size"]
    for n, size in m["row_size"].items():
        assert iqk_jax.row_bytes(name, int(n)) == size
    assert d.bpw == pytest.approx(d.block_bytes * 8 / 256)


@pytest.mark.parametrize("name", iqk_jax.types())
def test_scale_lut_and_grids_are_consistent(name):
    d = iqk_jax.descriptor(name)
    assert d.scale_lut.shape == (1 << d.scale_bits,)
    g = d.grid_values
    assert g.shape == (d.n_selectors, 1 << d.bits, d.group_size)
    assert g.dtype == np.float32 and np.isfinite(g).all()
    assert np.abs(g).max() <= 127.5  # every grid fits int8 (iq6_k's cubic rounds within)


def test_unknown_type_errors_name_it():
    with pytest.raises(ValueError, match="iq9_k"):
        iqk_jax.descriptor("iq9_k")
    with pytest.raises(ValueError, match="999"):
        iqk_jax.descriptor(999)


@pytest.mark.parametrize("n", [0, 100, 255, 257])
def test_row_bytes_rejects_bad_row_length(n):
    with pytest.raises(ValueError, match="multiple of 256"):
        iqk_jax.row_bytes("iq4_k", n)


@pytest.mark.parametrize("field,value,match", [
    ("block_size", 64, "block_size"),
    ("group_size", 3, "group_size"),
    ("row_header_bytes", 3, "row_header_bytes"),
    ("block_bytes", 100, "block_bytes"),
    ("scale_kind", "weird", "scale_kind"),
    ("bits", 3, "2\\*\\*bits"),
])
def test_descriptor_validation_names_the_field(field, value, match):
    d = iqk_jax.descriptor("iq4_k")
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(d, **{field: value})


def test_overlapping_pieces_are_rejected():
    d = iqk_jax.descriptor("iq4_k")
    dup = d.pieces + (d.pieces_of("sel")[0],)
    with pytest.raises(ValueError, match="overlap"):
        dataclasses.replace(d, pieces=dup)


def test_piece_validation():
    with pytest.raises(ValueError, match="nbits"):
        Piece("q", (0,), (0,), 9)
    with pytest.raises(ValueError, match="shift"):
        Piece("q", (0,), (6,), 4)
    with pytest.raises(ValueError, match="field"):
        Piece("zz", (0,), (0,), 1)


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(iqk_jax.descriptor("iq4_k"))
