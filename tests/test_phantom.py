"""The phantom is seeded, fast, and its three states differ the way the study's volumes do."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.phantom import (
    AIR,
    BINDER,
    MATRIX,
    RESIN,
    STATES,
    VOID,
    WARP,
    WEFT,
    PhantomVolume,
    write_volume_tiff,
)
from data_prep.volume import open_volume

DRY = (64, 96, 128)
# Yarn (fibre tow) volume fraction per state: the stated ranges the phantom is built to.
YARN_FRACTION = {"dry": (0.40, 0.55), "dry-compacted": (0.55, 0.70), "injected": (0.45, 0.62)}


@pytest.fixture(scope="module")
def phantoms():
    return {s: PhantomVolume(s, DRY, seed=5) for s in STATES}


@pytest.mark.parametrize("state", STATES)
def test_yarn_fraction_in_range(phantoms, state):
    p = phantoms[state]
    labels = p.labels(0, p.shape[0])
    yarn = np.isin(labels, [WARP, WEFT, BINDER]).mean()
    lo, hi = YARN_FRACTION[state]
    assert lo <= yarn <= hi, yarn
    assert {WARP, WEFT, BINDER} <= set(np.unique(labels))  # all three yarn families are present


def test_states_differ_as_in_the_study(phantoms):
    depth = {s: phantoms[s].shape[0] for s in STATES}
    assert depth["dry-compacted"] / depth["dry"] == pytest.approx(0.55, abs=0.02)
    assert depth["injected"] / depth["dry"] == pytest.approx(0.8, abs=0.02)
    yarn = {s: np.isin(phantoms[s].labels(0, depth[s]), [WARP, WEFT, BINDER]).mean() for s in STATES}
    assert yarn["dry-compacted"] > yarn["injected"] > yarn["dry"]  # compaction packs the tows
    grey = {}
    for s in STATES:
        p = phantoms[s]
        lab, g = p.labels(0, depth[s]), p.grey(0, depth[s])
        grey[s] = float(g[lab == MATRIX].mean())
        assert (lab == VOID).any() == (s == "injected")  # voids only where there is resin to hold them
    assert grey["dry"] == pytest.approx(AIR) and grey["injected"] == pytest.approx(RESIN)
    # after CT blur and noise: resin sits between air and yarn in grey level
    vol = {s: phantoms[s].array().astype(np.float64) for s in ("dry", "injected")}
    lab = {s: phantoms[s].labels(0, depth[s]) for s in ("dry", "injected")}
    air = np.median(vol["dry"][lab["dry"] == MATRIX])
    resin = np.median(vol["injected"][lab["injected"] == MATRIX])
    yarn_grey = np.median(vol["injected"][lab["injected"] == WEFT])
    assert air < resin < yarn_grey


def test_seeded(phantoms):
    again = PhantomVolume("dry", DRY, seed=5).pages(10, 14)
    np.testing.assert_array_equal(again, phantoms["dry"].pages(10, 14))
    assert not np.array_equal(PhantomVolume("dry", DRY, seed=6).pages(10, 14), again)


def test_written_tiff_reads_back(tmp_path, phantoms):
    p = phantoms["injected"]
    path = write_volume_tiff(tmp_path / "injected.tif", p, pages_per_slab=7)  # slab size must not matter
    with open_volume(path) as vol:
        assert vol.shape == p.shape and vol.dtype == np.uint16
        np.testing.assert_array_equal(vol.read(0, p.shape[0]), p.array())
    assert not list(tmp_path.glob("*.part"))


def test_ring_artefacts_optional():
    a = PhantomVolume("dry", DRY, seed=1).pages(0, 2).astype(np.int64)
    b = PhantomVolume("dry", DRY, seed=1, rings=True).pages(0, 2).astype(np.int64)
    assert np.abs(a - b).max() > 0
