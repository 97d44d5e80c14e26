import dataclasses
from pathlib import Path

import numpy as np
import pytest

from blochflow.crystal import cell as cellmod
from blochflow.crystal.structure import Crystal, crystal_from_record
from blochflow.io.pets import (FrameTable, MeasurementDetails, PetsDataset, ReflectionTable, every_nth_frame_mask,
                               read_pets, select_frames)
from blochflow.io.structure_cif import read_structure
from blochflow.io.writers import atomic_write_text, format_pets
from blochflow.physics.plan import BeamSettings
from blochflow.refine.model import ModelSettings
from blochflow.simulate import ThicknessSpec, synthesize

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "src" / "blochflow" / "data" / "examples" / "quartz"
SHARED = ROOT.parent / "shared" / "data"
N_SAMPLES = 4  # tilt samples per frame in the small refinement datasets


@pytest.fixture(scope="session")
def quartz_paths():
    return EXAMPLE / "quartz_reference.cif", EXAMPLE / "quartz.cif_pets"


@pytest.fixture(scope="session")
def quartz_synthetic_path():
    p = SHARED / "quartz" / "synthetic" / "quartz_paper_data.cif_pets"
    if not p.exists():
        pytest.skip("shared data not present")
    return p


@pytest.fixture(scope="session")
def truth(quartz_paths):
    return crystal_from_record(read_structure(quartz_paths[0]))


def every_nth_frame(path, step: int):
    """The dataset at ``path`` with every ``step``-th frame kept."""
    ds = read_pets(path)
    return select_frames(ds, every_nth_frame_mask(len(ds.frames), step))


def simulated(ds, truth: Crystal, thickness, n_samples: int, *, noise: str = "poisson", max_counts: float = 1e6,
              seed: int = 0):
    """``ds`` with its scored reflections replaced by intensities simulated from ``truth`` (known truth)."""
    rows, i_obs, sigma = synthesize(truth, ds, ThicknessSpec(mean=thickness),
                                    ModelSettings(beams=BeamSettings(n_samples=n_samples)),
                                    noise=noise, max_counts=max_counts, seed=seed)
    r = ds.reflections
    return dataclasses.replace(ds, reflections=ReflectionTable(r.hkl[rows], i_obs, sigma, r.frame_id[rows]))


@pytest.fixture(scope="session")
def small_dataset(quartz_paths, truth, tmp_path_factory):
    """Six quartz frames simulated from the reference structure (known truth), Poisson noise."""
    ds = every_nth_frame(quartz_paths[1], 8)
    thickness = 450 + 100 * np.cos(np.radians(ds.frames.alpha_deg))
    ds = simulated(ds, truth, thickness, N_SAMPLES, seed=3)
    r = ds.reflections
    path = tmp_path_factory.mktemp("refine") / "small.cif_pets"
    atomic_write_text(path, format_pets(ds, r.hkl, r.intensity, r.sigma, r.frame_id))
    return ds, thickness, path


def _rmsd(xyz, truth: Crystal) -> float:
    d = (xyz.detach() - truth.asu.xyz).numpy()
    d -= np.round(d)
    return float(np.sqrt(np.mean(np.sum((d @ cellmod.direct_basis(truth.cell).T) ** 2, 1))))


def rotation_frames(cell, n_frames: int, dstarmax: float):
    """A continuous-rotation geometry for ``cell`` (0.025 A, 1.5 deg frames over -35..35 deg, a
    random crystal orientation) listing every reflection within ``dstarmax`` on every frame."""
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    b = cellmod.reciprocal_basis(cell)
    top = [int(dstarmax / np.linalg.norm(b[:, i] - b[:, [j for j in range(3) if j != i]] @ np.linalg.lstsq(
        b[:, [j for j in range(3) if j != i]], b[:, i], rcond=None)[0])) + 1 for i in range(3)]
    hkl = np.array([(h, k, l) for h in range(-top[0], top[0] + 1) for k in range(-top[1], top[1] + 1)
                    for l in range(-top[2], top[2] + 1) if 0 < np.linalg.norm(b @ (h, k, l)) < dstarmax])
    ids = np.arange(1, n_frames + 1)
    frames = FrameTable(ids, np.tile([1.0, 0, 0], (n_frames, 1)), np.full(n_frames, 0.75),
                        np.linspace(-35, 35, n_frames), np.zeros(n_frames), np.full(n_frames, 0.3), np.ones(n_frames))
    n = len(hkl)
    refl = ReflectionTable(np.tile(hkl, (n_frames, 1)), np.ones(n * n_frames), np.ones(n * n_frames), np.repeat(ids, n))
    return PetsDataset("made-up geometry", tuple(cell), 0.02508, q @ b,
                       MeasurementDetails("continuous", dstarmax, 0.001, 0.05, 0.484), frames, refl)
