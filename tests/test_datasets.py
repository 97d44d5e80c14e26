"""Several datasets refined together (io.pets.merge_datasets): each frame with its own dataset's UB and
rotation axis; the merged model computes what each dataset's own model computes."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import N_SAMPLES, every_nth_frame

from blochflow.io.pets import merge_datasets, select_frames
from blochflow.physics.plan import BeamSettings
from blochflow.refine.model import ForwardModel, ModelSettings
from blochflow.simulate import ThicknessSpec


def _intensities(crystal, ds) -> dict:
    """{(frame id, h, k, l): I} of the scored reflections at 500 A."""
    model = ForwardModel(crystal, ds, ModelSettings(beams=BeamSettings(n_samples=N_SAMPLES)))
    with torch.no_grad():
        ic = model.intensities(ThicknessSpec(mean=500.0).frame_state(ds)).numpy()
    rows = model.plan.scored.row
    r = ds.reflections
    return {(int(f), *map(int, h)): float(i) for f, h, i in zip(r.frame_id[rows], r.hkl[rows], ic)}


def _turned(ds, degrees: float, axis_deg: float):
    """The dataset as another crystal would give it: UB turned by ``degrees`` about the lab x axis (other
    reflections in the Ewald sphere) and by 40 deg about the beam, the rotation axis at ``axis_deg``."""
    t, z = np.radians(degrees), np.radians(40.0)
    q = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]]) @ np.array(
        [[np.cos(z), -np.sin(z), 0.0], [np.sin(z), np.cos(z), 0.0], [0.0, 0.0, 1.0]])
    return dataclasses.replace(ds, ub=q @ ds.ub, details=dataclasses.replace(ds.details, rotation_axis_deg=axis_deg),
                               path="other.cif_pets")


def test_merged_datasets_compute_what_each_computes_alone(quartz_paths, truth):
    """Two crystals: the bundled frames, and the same frames of a crystal turned 2 deg about the lab x
    axis and 40 deg about the beam, whose rotation axis sits 7 deg elsewhere. The merged model gives each frame the intensities of its
    own dataset's model (its UB, its axis carried in omega); frame ids that collide are renumbered."""
    one = every_nth_frame(quartz_paths[1], 25)
    two = _turned(one, 2.0, one.details.rotation_axis_deg + 7.0)
    merged = merge_datasets([one, two])
    base = 10 ** len(str(int(one.frames.ids.max())))
    assert list(merged.frames.ids) == list(one.frames.ids) + list(one.frames.ids + base)
    assert list(merged.frames.dataset) == [0] * len(one.frames) + [1] * len(one.frames)
    assert list(merged.frames.dataset_frame) == list(one.frames.ids) * 2
    alone = {**_intensities(truth, one),
             **{(f + base, *h): i for (f, *h), i in _intensities(truth, two).items()}}
    together = _intensities(truth, merged)
    assert together.keys() == alone.keys() and len(alone) > 50
    assert np.allclose([together[k] for k in alone], list(alone.values()), rtol=1e-9, atol=1e-12)
    # each frame's rotation axis (about which its tilt samples, orientation corrections and tilt search turn)
    # is its own dataset's
    from blochflow.experiment.frames import FrameContext
    from blochflow.physics.geometry import rotation_axis_lab

    def axes(ds):
        ctx = FrameContext.from_dataset(ds)
        return rotation_axis_lab(ctx.omega, ctx.axis_azimuth).numpy()

    assert np.allclose(axes(merged), np.concatenate([axes(one), axes(two)]), atol=1e-12)
    assert not np.allclose(axes(one), axes(two), atol=0.01)
    # a merge that gave every frame the first dataset's UB would compute other intensities: the test can fail
    wrong = dataclasses.replace(merged, frames=dataclasses.replace(
        merged.frames, ub=np.repeat(np.asarray(one.ub, float)[None], len(merged.frames), 0)))
    other = _intensities(truth, wrong)
    assert other.keys() != alone.keys()


def test_merging_checks_and_keeps_ids(quartz_paths):
    one = every_nth_frame(quartz_paths[1], 25)
    half = len(one.frames) // 2
    a = select_frames(one, np.arange(len(one.frames)) < half)
    b = select_frames(one, np.arange(len(one.frames)) >= half)
    merged = merge_datasets([a, b])
    assert list(merged.frames.ids) == list(one.frames.ids)  # no collision: ids kept
    assert np.array_equal(merged.reflections.frame_id, np.concatenate([a.reflections.frame_id, b.reflections.frame_id]))
    sub = select_frames(merged, merged.frames.dataset == 1)
    assert list(sub.frames.dataset_frame) == list(b.frames.ids) and sub.frames.ub.shape == (len(b.frames), 3, 3)
    with pytest.raises(ValueError, match="wavelength"):
        merge_datasets([one, dataclasses.replace(one, wavelength=one.wavelength * 1.01, path="x")])
    precession = dataclasses.replace(one, details=dataclasses.replace(one.details, geometry="precession"), path="p")
    with pytest.raises(ValueError, match="precession dataset"):
        merge_datasets([one, precession])
    assert merge_datasets([one]) is one


@pytest.mark.parametrize("setting, message", [({"thickness_model": "global"}, "describes one crystal"),
                                              ({"thickness_model": "learned"}, "describes one crystal"),
                                              ({"axis_search": True}, "one path"),
                                              ({"rocking_axis": "fixed"}, "needs one dataset")])
def test_one_crystal_models_are_refused_with_several(quartz_paths, truth, setting, message):
    from blochflow.refine.run import build_problem
    from blochflow.refine.settings import RefineSettings

    one = every_nth_frame(quartz_paths[1], 25)
    merged = merge_datasets([one, _turned(one, 2.0, 7.0)])
    with pytest.raises(ValueError, match=message):
        build_problem(truth, merged, RefineSettings(n_samples=2, samples_per_fringe=0.0, **setting))


def test_two_crystals_refine_together_from_the_command_line(small_dataset, quartz_paths, truth, tmp_path, capsys):
    """Known truth on two made-up crystals (the small dataset's six frames, and the same frames of a
    turned crystal simulated from the truth): the refine command takes both files, renumbers the second's
    frame ids, names each frame's dataset in frames.csv, and the structure comes back to the truth;
    datasets of two wavelengths are refused in one line."""
    import json

    from conftest import _rmsd, simulated

    from blochflow.cli import main
    from blochflow.crystal.structure import crystal_from_record
    from blochflow.data import example_path
    from blochflow.io.structure_cif import read_structure
    from blochflow.io.writers import atomic_write_text, format_pets

    ds, thickness, first = small_dataset
    two = simulated(_turned(ds, 2.0, ds.details.rotation_axis_deg + 7.0), truth, thickness, N_SAMPLES, seed=5)
    second = tmp_path / "second.cif_pets"
    r = two.reflections
    atomic_write_text(second, format_pets(two, r.hkl, r.intensity, r.sigma, r.frame_id))
    start = example_path("quartz", "quartz_kinematical.cif")  # the truth is the reference model
    out = tmp_path / "both"
    args = ["--samples", str(N_SAMPLES), "--set", "samples_per_fringe=0", "--thickness", "500", "--lm-iterations", "8",
            "--free-fraction", "0"]
    assert main(["refine", str(start), str(first), str(second), "--out", str(out), *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == [str(first), str(second)]
    frames = summary["frames"]
    n = len(ds.frames)
    assert frames["dataset"] == [1] * n + [2] * n and frames["dataset_frame"] == list(ds.frames.ids) * 2
    assert len(set(frames["frame"])) == 2 * n
    per = summary["datasets"]
    assert [d["dataset"] for d in per] == [1, 2] and [d["path"] for d in per] == [str(first), str(second)] and sum(d["n_all"] for d in per) == summary["n_all"]
    assert all(d["R_obs"] < 2 * summary["R_obs"] + 0.01 for d in per)
    refined = crystal_from_record(read_structure(out / "refined.cif"))
    before = _rmsd(crystal_from_record(read_structure(start)).asu.xyz, truth)
    assert before > 0.005 and summary["GoF"] < 1.3  # 0.0058 -> 0.0004 A, GoF 1.01 when measured
    assert _rmsd(refined.asu.xyz, truth) < 0.001
    assert "dataset" in (out / "frames.csv").read_text().splitlines()[0]
    other = tmp_path / "other.cif_pets"
    atomic_write_text(other, format_pets(dataclasses.replace(two, wavelength=0.0197), r.hkl, r.intensity, r.sigma,
                                         r.frame_id))
    capsys.readouterr()
    assert main(["refine", str(start), str(first), str(other), "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wavelength" in err and "other.cif_pets" in err
    # --wavelength states every file's: they then merge (a dry run builds the merged problem)
    assert main(["refine", str(start), str(first), str(other), "--out", str(tmp_path / "x"), *args,
                 "--wavelength", "0.0251", "--dry-run"]) == 0
