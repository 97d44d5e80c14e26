"""`blochflow simulate`: summary, reflection table, and the --write-pets round trip."""

import csv
import json

import numpy as np
import torch

from blochflow.cli import main
from blochflow.io.pets import read_pets

FAST = ["--g-max", "1.3", "--s-max", "0.015", "--samples", "4"]


def test_write_pets_round_trip(tmp_path, quartz_paths):
    syn = tmp_path / "syn.cif_pets"
    assert main(["simulate", *map(str, quartz_paths), "--out", str(tmp_path / "o1"), "--thickness", "350",
                 "--write-pets", str(syn), "--noise", "none", *FAST]) == 0
    ds = read_pets(syn)
    # every written intensity is the model's at 350 A times one factor for the whole file (the largest at
    # --max-counts): a frame scaled on its own, or a row written to the wrong reflection, would break the
    # ratio (the re-simulation below fits a scale per frame and would not see the first)
    from blochflow.crystal.structure import crystal_from_record
    from blochflow.io.structure_cif import read_structure
    from blochflow.physics.plan import BeamSettings
    from blochflow.refine.model import ForwardModel, ModelSettings

    model = ForwardModel(crystal_from_record(read_structure(quartz_paths[0])), ds,
                         ModelSettings(beams=BeamSettings(g_max=1.3, s_max=0.015, n_samples=4)))
    model.fit_samples_to_fringes(350.0, 1.2)  # simulate's samples per fringe
    assert len(model.plan.scored.row) == len(ds.reflections.intensity)
    ratio = ds.reflections.intensity[model.plan.scored.row] / model.intensities(model.frame_state(350.0)).numpy()
    assert ratio.std() < 1e-9 * ratio.mean() and ds.reflections.intensity.max() == 1e5
    orig = read_pets(quartz_paths[1])
    assert len(ds.frames) == len(orig.frames)
    np.testing.assert_allclose(ds.ub, orig.ub)
    threads = torch.get_num_threads()
    try:  # solved on three threads, compared with data solved on the default count: the same numbers
        assert main(["--threads", "3", "simulate", str(quartz_paths[0]), str(syn), "--out", str(tmp_path / "o2"),
                     "--thickness", "350", *FAST]) == 0
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert main(["--threads", "0", "simulate", str(quartz_paths[0]), str(syn), "--out", str(tmp_path / "o3")]) == 2
    summary = json.loads((tmp_path / "o2" / "summary.json").read_text())
    for key in ("R_obs", "wR2", "GoF", "R_obs_frame_mean", "wR2_frame_mean", "n_obs", "n_all", "n_frames",
                "n_beams_mean", "elapsed_s"):
        assert key in summary
    assert summary["R_obs"] < 1e-6 and summary["n_obs"] > 100
    rows = list(csv.DictReader(open(tmp_path / "o2" / "reflections.csv")))
    assert len(rows) == summary["n_all"] and set(rows[0]) == {"frame", "h", "k", "l", "Io", "sigma", "Ic_scaled"}


def test_poisson_noise_and_thickness_distribution(tmp_path, quartz_paths):
    syn = tmp_path / "noisy.cif_pets"
    assert main(["simulate", *map(str, quartz_paths), "--out", str(tmp_path / "o"), "--thickness-expr",
                 "400/cos(radians(alpha))", "--thickness-spread", "60", "--write-pets", str(syn),
                 "--max-counts", "1e4", *FAST]) == 0
    ds = read_pets(syn)
    i = ds.reflections.intensity
    assert np.all(i == np.round(i)) and i.max() > 5e3  # Poisson counts
    assert main(["simulate", str(quartz_paths[0]), str(syn), "--out", str(tmp_path / "o2"), "--thickness-expr",
                 "400/cos(radians(alpha))", "--thickness-spread", "60", *FAST]) == 0
    s = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert 0.0 < s["R_obs"] < 0.1 and 0.5 < s["GoF"] < 2.0  # noise only: GoF near 1


def test_simulate_sizes_the_samples_for_the_thickness(tmp_path, quartz_paths):
    """By default every frame gets 1.2 samples per Pendelloesung fringe at its thickness: at 4 samples
    a 600 A crystal's rocking integral is wrong by tens of percent, sized it agrees with 4x the samples."""
    base = ["simulate", *map(str, quartz_paths), "--g-max", "1.3", "--s-max", "0.015", "--thickness", "600"]

    def run(name, *extra):
        assert main([*base, "--out", str(tmp_path / name), *extra]) == 0
        s = json.loads((tmp_path / name / "summary.json").read_text())
        ic = np.array([float(r["Ic_scaled"]) for r in csv.DictReader(open(tmp_path / name / "reflections.csv"))])
        return s, ic

    fixed, ic_fixed = run("fixed", "--samples", "4", "--samples-per-fringe", "0")
    sized, ic_sized = run("sized", "--samples", "4")
    fine, ic_fine = run("fine", "--samples", "4", "--samples-per-fringe", "4.8")
    assert fixed["samples_per_frame"]["max"] == 4 and sized["samples_per_frame"]["min"] > 4
    assert fine["samples_per_frame"]["mean"] > 3 * sized["samples_per_frame"]["mean"]

    def err(ic):
        return np.abs(np.sqrt(ic) - np.sqrt(ic_fine)).sum() / np.sqrt(ic_fine).sum()

    assert err(ic_fixed) > 0.05 and err(ic_sized) < 0.01, (err(ic_fixed), err(ic_sized))


def test_physics_flags_out_of_range_are_named(tmp_path, quartz_paths, capsys):
    """A beam or scoring limit out of range is a one-line error naming the flag, and nothing is
    written (a negative --s-max used to run and write a simulation with no coupled beams)."""
    for flag, value in (("--s-max", "-1"), ("--g-max", "0"), ("--rsg", "-0.5"), ("--kappa", "-1"), ("--dsg", "-0.1"),
                        ("--s-bethe", "-0.01")):
        capsys.readouterr()
        assert main(["simulate", *map(str, quartz_paths), "--out", str(tmp_path / "o"), flag, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err, err
    assert not (tmp_path / "o").exists()


def test_a_relative_write_pets_path_is_taken_from_the_working_directory(tmp_path, quartz_paths, monkeypatch):
    """Like any path argument (scripts pass one and read it back from where they run)."""
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", *map(str, quartz_paths), "--out", "o", "--thickness", "350", "--write-pets", "syn.cif_pets",
                 "--noise", "none", *FAST]) == 0
    assert (tmp_path / "syn.cif_pets").is_file()


def test_a_barely_determined_fit_is_flagged():
    from blochflow.cli import determinacy_warning

    assert "not determined" in determinacy_warning(300, 301)
    assert "ratio 1.1" in determinacy_warning(306, 289) and "17 degrees of freedom" in determinacy_warning(306, 289)
    assert determinacy_warning(1829, 311) is None  # quartz: 5.9 per parameter


def test_frames_with_an_undetermined_thickness_are_named():
    from blochflow.cli import thickness_note

    frames = {"frame": [1, 2, 3], "thickness_mean": [500.0, 2600.0, 800.0],
              "thickness_mean_su": [40.0, 1500.0, float("nan")]}
    note = thickness_note(frames)
    assert note.startswith("note: 1 of 3 frames") and "(frames 2)" in note
    frames["thickness_mean_su"][1] = 1000.0
    assert thickness_note(frames) is None


def test_paper_synthetic_configs_hold_the_benchmark_physics():
    """examples/paper_synthetic_*.toml (README's commands for the paper's synthetic data) are valid
    settings files with exactly the physics benchmarks/synthetic_recovery.py refines those data with."""
    import importlib.util
    from pathlib import Path

    from blochflow.cli import _read_config
    from blochflow.refine.settings import settings_from_mapping

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("synthetic_recovery", root / "benchmarks" / "synthetic_recovery.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for dataset in ("quartz", "paracetamol"):
        path = root / "examples" / f"paper_synthetic_{dataset}.toml"
        values = _read_config(str(path))
        settings = settings_from_mapping(values, str(path))
        physics = {**bench.PAPER_PHYSICS, **bench.DATASET_PHYSICS[dataset]}
        assert {k: getattr(settings, k) for k in physics} == physics
        assert settings.refine_orientation is False


def test_simulate_takes_the_physics_of_a_refine_config(tmp_path, quartz_paths, capsys):
    """--config on simulate: the file's physics where no option is given, options win, the optimiser's
    settings are ignored, an unknown name is a one-line error naming the file."""
    structure, data = (str(p) for p in quartz_paths)
    cfg = tmp_path / "paper.toml"
    cfg.write_text('g_max = 1.3\ns_max = 0.012\nsample_rule = "linspace"\nn_samples = 3\nsamples_per_fringe = 0.0\n'
                   'coupling = "segments"\nthickness = 400\nadam_steps = 7\n')
    assert main(["simulate", structure, data, "--out", str(tmp_path / "a"), "--config", str(cfg)]) == 0
    beams = json.loads((tmp_path / "a" / "summary.json").read_text())["settings"]["beams"]
    assert (beams["g_max"], beams["s_max"], beams["n_samples"], beams["sample_rule"], beams["coupling"]) == \
        (1.3, 0.012, 3, "linspace", "segments")
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["thickness"] == 400.0
    assert main(["simulate", structure, data, "--out", str(tmp_path / "b"), "--config", str(cfg),
                 "--s-max", "0.015", "--samples", "2"]) == 0
    beams = json.loads((tmp_path / "b" / "summary.json").read_text())["settings"]["beams"]
    assert (beams["s_max"], beams["n_samples"], beams["g_max"]) == (0.015, 2, 1.3)
    capsys.readouterr()
    cfg.write_text("s_maxx = 0.01\n")
    assert main(["simulate", structure, data, "--out", str(tmp_path / "c"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "paper.toml" in err and "s_maxx" in err


def test_a_spread_applies_to_a_profile_without_one_and_two_thickness_models_are_refused(tmp_path, quartz_paths, capsys):
    """--thickness-spread spreads a profile that has no spread column (it was dropped silently: the data
    came out as without it); a profile with its own spread, two thickness models at once (a value and an
    expression, say: one was ignored) and a negative spread are one-line errors."""
    ids = [int(f) for f in read_pets(quartz_paths[1]).frames.ids]
    flat = tmp_path / "flat.csv"
    flat.write_text("frame,thickness\n" + "".join(f"{f},400\n" for f in ids))
    base = ["simulate", *map(str, quartz_paths), "--noise", "none", "--frames", "1-99:10", *FAST]
    written = {}
    for name, extra in (("sharp", []), ("spread", ["--thickness-spread", "60"])):
        written[name] = tmp_path / f"{name}.cif_pets"
        assert main([*base, "--out", str(tmp_path / name), "--thickness-profile", str(flat), *extra,
                     "--write-pets", str(written[name])]) == 0
    sharp, spread = (read_pets(written[n]).reflections.intensity for n in ("sharp", "spread"))
    assert np.abs(spread - sharp).max() > 1e-3 * sharp.max()
    with_spread = tmp_path / "with_spread.csv"
    with_spread.write_text("frame,thickness,spread\n" + "".join(f"{f},400,20\n" for f in ids))
    for extra, words in ((["--thickness-profile", str(with_spread), "--thickness-spread", "60"], "leave out --thickness-spread"),
                         (["--thickness", "900", "--thickness-expr", "600"], "give one of --thickness, --thickness-expr"),
                         (["--thickness", "400", "--thickness-spread", "-30"], "must not be negative")):
        capsys.readouterr()
        assert main([*base, "--out", str(tmp_path / "bad"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_version(capsys):
    import pytest

    from blochflow import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"blochflow {__version__}"
