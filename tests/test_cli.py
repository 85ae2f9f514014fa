"""The openmm-backmap command line."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from openmm_backmap import cli
from openmm_backmap.cli import main
from openmm_backmap.data import AADataset, CGDataset


def test_simulate_with_config_file_and_written_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"system": "alanine-dipeptide", "solvent": "vacuum", "ns": 0.004,
                                   "interval": 20, "out": str(tmp_path / "v.h5")}))
    assert main(["simulate", "--config", str(cfg), "--seed", "5"]) == 0
    used = yaml.safe_load((tmp_path / "v.config.yaml").read_text())
    assert used["solvent"] == "vacuum" and used["seed"] == 5 and used["interval"] == 20
    with AADataset(tmp_path / "v.h5") as ds:
        assert ds.n_frames == 100 and ds.settings["solvent"] == "vacuum"
    # refusing to clobber, then extending with --append
    assert main(["simulate", "--config", str(cfg)]) == 1
    assert main(["simulate", "--config", str(cfg), "--append", "--ns", "0.008"]) == 0
    with AADataset(tmp_path / "v.h5") as ds:
        assert ds.n_frames == 200 and len(np.unique(ds.step)) == 200


def test_errors_are_one_line_with_hint(tmp_path, capsys):
    assert main(["map", "--data", str(tmp_path / "missing.h5"), "--preset", "ca"]) == 1
    err = capsys.readouterr().err
    assert "error: no such trajectory file" in err and "hint:" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense_key: 3\n")
    assert main(["simulate", "--config", str(bad)]) == 1
    assert "unknown settings ['nonsense_key']" in capsys.readouterr().err
    assert main(["train-potential", "--config", str(tmp_path / "nope.yaml")]) == 1
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["train-potential", "--data", "missing_cg.h5"], "--data"),
    (["train-backmapper", "--data", "missing_aa.h5", "--preset", "backbone-cb"], "--data"),
    (["run", "--potential", "p.pt", "--backmapper", "b.pt", "--data", "aa.h5"], "--backmapper"),
    (["backmap", "--cg", "cg.dcd", "--backmapper", "b.pt"], "--cg"),
    (["evaluate", "--reference", "ref.h5", "--backmapped", "aa.dcd"], "--reference"),
])
def test_missing_inputs_exit_1_with_one_line(tmp_path, monkeypatch, capsys, argv, flag):
    import torch

    monkeypatch.chdir(tmp_path)
    if argv[0] == "evaluate":
        pytest.importorskip("openmm_backmap.evaluation")
    threads = torch.get_num_threads()
    assert main(argv + ["--threads", str(threads + 1)]) == 1
    assert torch.get_num_threads() == threads  # an in-process caller's torch is left as it was
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(f"openmm-backmap {argv[0]}: error: {flag} ")
    assert "no such file" in err[0] and err[1].strip() == "hint: check the path"
    with pytest.raises(FileNotFoundError):
        main(argv + ["--debug"])


def test_help_shows_examples():
    out = subprocess.run([sys.executable, "-m", "openmm_backmap.cli", "simulate", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "openmm-backmap simulate --system" in out.stdout


@pytest.mark.parametrize("command", ["train-potential", "train-backmapper", "run", "backmap", "evaluate", "bench",
                                     "demo"])
def test_every_command_has_help_with_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"openmm-backmap {command} " in text.split("example", 1)[1] and "--config" in text


def test_defaults_follow_the_library():
    from openmm_backmap.backmap.model import DEFAULT_ARCHITECTURE
    from openmm_backmap.potential.trainer import DEFAULT_NETWORK

    assert cli.DEFAULTS["train-potential"]["hidden"] == DEFAULT_NETWORK["hidden"]
    assert cli.DEFAULTS["train-potential"]["cutoff_nm"] == DEFAULT_NETWORK["cutoff_nm"]
    assert cli.DEFAULTS["train-backmapper"]["hidden"] == DEFAULT_ARCHITECTURE["hidden"]
    assert cli.DEFAULTS["train-backmapper"]["environment_cutoff_nm"] == DEFAULT_ARCHITECTURE["environment_cutoff_nm"]
    assert cli.DEFAULTS["train-backmapper"]["latent_prior"] == DEFAULT_ARCHITECTURE["latent_prior"]
    assert cli.DEFAULTS["train-backmapper"]["units"] == DEFAULT_ARCHITECTURE["units"]
    for command, defaults in cli.DEFAULTS.items():
        assert set(defaults) <= {a.dest for p in _subparsers() if p.prog.endswith(" " + command)
                                 for a in p._actions}, command


def _subparsers():
    parser = cli._parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices.values())


# ----------------------------------------------------------------------------------------------------
# The pipeline on tiny data: simulate -> map -> train-potential -> train-backmapper -> run -> backmap -> evaluate
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Tiny versions of every artefact (seconds): 500 AA frames 0.1 ps apart, a 2-epoch potential and backmapper."""
    root = tmp_path_factory.mktemp("cli")
    aa, cg = root / "aa.h5", root / "cg.h5"
    assert main(["simulate", "--ns", "0.05", "--interval", "50", "--equilibrate-ps", "1", "--out", str(aa),
                 "--platform", "Reference"]) == 0
    assert main(["map", "--data", str(aa), "--preset", "backbone-cb", "--out", str(cg)]) == 0
    potential = root / "models" / "potential.pt"
    assert main(["train-potential", "--data", str(cg), "--out", str(potential), "--epochs", "2", "--hidden", "16",
                 "--cutoff-nm", "0.6", "--max-frames", "400", "--batch-size", "64"]) == 0
    backmapper = root / "models" / "backmapper.pt"
    assert main(["train-backmapper", "--data", str(aa), "--preset", "backbone-cb", "--lag-ps", "0.2",
                 "--epochs", "2", "--hidden", "32", "--batch-size", "64", "--out", str(backmapper)]) == 0
    return {"root": root, "aa": aa, "cg": cg, "potential": potential, "backmapper": backmapper}


def test_map_with_optimised_force_map(pipeline, tmp_path):
    from openmm_backmap.data import AADataset, CGDataset
    from openmm_backmap.mapping import CGMapping

    out = tmp_path / "cg_opt.h5"
    assert main(["map", "--data", str(pipeline["aa"]), "--preset", "backbone-cb", "--optimize-force-map",
                 "--out", str(out)]) == 0
    with AADataset(pipeline["aa"]) as aa:
        topology, forces = aa.topology, aa.forces[:].astype(np.float64)
        expected = CGMapping.from_preset(topology, "backbone-cb").with_optimized_force_map(aa)
    saved = CGMapping.load(out.with_suffix(".mapping.yaml"), topology)
    assert saved.has_optimized_force_map
    assert np.allclose(saved.force_matrix, expected.force_matrix, atol=1e-10)
    with CGDataset(out) as cg, CGDataset(pipeline["cg"]) as plain:
        assert np.allclose(cg.forces[:], saved.map_forces(forces), atol=1e-2)
        assert np.mean(cg.forces[:] ** 2) < np.mean(plain.forces[:] ** 2)  # less noise than the bead net forces


def test_train_potential_outputs_and_resume(pipeline, tmp_path, capsys):
    from openmm_backmap.potential import CGPotential

    potential = pipeline["potential"]
    model = CGPotential.load(potential)
    assert model.networks[0].config()["hidden"] == 16 and model.metadata["frames"]["train"] == 320
    log = potential.with_name("potential.training.csv")
    assert len(log.read_text().splitlines()) == 3  # header + 2 epochs
    assert potential.with_name("potential.checkpoint.pt").exists()
    used = yaml.safe_load(potential.with_name("potential.config.yaml").read_text())
    assert used["command"] == "train-potential" and used["hidden"] == 16 and used["epochs"] == 2
    # refusing to clobber; --resume continues the same run to more epochs
    argv = ["train-potential", "--config", str(potential.with_name("potential.config.yaml"))]
    assert main(argv) == 1 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--resume", "--epochs", "3"]) == 0
    assert [line.split(",")[0] for line in log.read_text().splitlines()[1:]] == ["1", "2", "3"]
    # priors only, with the AA topology and mapping given explicitly
    priors = tmp_path / "priors.pt"
    assert main(["train-potential", "--data", str(pipeline["cg"]), "--aa-data", str(pipeline["aa"]), "--preset",
                 "backbone-cb", "--priors-only", "--out", str(priors)]) == 0
    assert CGPotential.load(priors).networks == []


def test_train_potential_needs_the_aa_topology(pipeline, tmp_path, capsys):
    moved = tmp_path / "cg_only.h5"
    moved.write_bytes(pipeline["cg"].read_bytes())
    import h5py

    with h5py.File(moved, "a") as f:  # pretend the AA dataset it was mapped from is gone
        settings = json.loads(f.attrs["settings"])
        settings["mapped_from"] = str(tmp_path / "gone.h5")
        f.attrs["settings"] = json.dumps(settings)
    assert main(["train-potential", "--data", str(moved), "--out", str(tmp_path / "p.pt")]) == 1
    err = capsys.readouterr().err
    assert "gone.h5" in err and "--aa-data" in err


def test_train_backmapper_lag_and_baseline(pipeline, tmp_path, capsys):
    from openmm_backmap.backmap import TemporalBackmapper

    bm = TemporalBackmapper.load(pipeline["backmapper"])
    assert bm.lag_ps == pytest.approx(0.2) and bm.condition_on_previous and bm.config["hidden"] == 32
    assert pipeline["backmapper"].with_name("backmapper.training.csv").exists()
    base = tmp_path / "frame.pt"
    assert main(["train-backmapper", "--data", str(pipeline["aa"]), "--preset", "backbone-cb", "--lag-ps", "0.5",
                 "--epochs", "1", "--hidden", "16", "--frame-based", "--no-energy", "--out", str(base)]) == 0
    frame = TemporalBackmapper.load(base)
    assert not frame.condition_on_previous and frame.lag_ps == pytest.approx(0.5)
    assert main(["train-backmapper", "--data", str(pipeline["aa"]), "--preset", "backbone-cb", "--lag-ps", "0.05",
                 "--out", str(tmp_path / "x.pt")]) == 1
    assert "shorter than the frame spacing" in capsys.readouterr().err
    assert main(["train-backmapper", "--data", str(pipeline["aa"]), "--out", str(tmp_path / "x.pt")]) == 1
    assert "--preset NAME or --mapping" in capsys.readouterr().err


def _steps(path):
    from openmm_backmap.formats import existing_steps

    return list(existing_steps(path))


def test_run_backmaps_on_the_fly_and_appends(pipeline, capsys):
    import mdtraj as md

    out = pipeline["root"] / "run"
    argv = ["run", "--potential", str(pipeline["potential"]), "--backmapper", str(pipeline["backmapper"]),
            "--data", str(pipeline["aa"]), "--start-frame", "-1", "--out", str(out)]
    assert main(argv + ["--ns", "0.0008"]) == 0  # 200 steps of 4 fs; lag 0.2 ps -> a frame every 50 steps
    assert str(out.resolve()) in capsys.readouterr().out
    aa = md.load(str(out / "aa.dcd"), top=str(out / "aa.pdb"))
    cg = md.load(str(out / "cg.dcd"), top=str(out / "cg.pdb"))
    assert aa.n_frames == 4 and aa.n_atoms == 22 and cg.n_frames == 4 and cg.n_atoms == 6
    assert np.isfinite(aa.xyz).all()
    for name in ("cg_log.csv", "checkpoint.chk", "current.pdb", "run.config.yaml"):
        assert (out / name).exists(), name
    # the bead atoms of the backmapped frames sit on the CG beads
    from openmm_backmap.backmap import TemporalBackmapper

    mapping = TemporalBackmapper.load(pipeline["backmapper"]).mapping
    np.testing.assert_allclose(mapping.map_positions(aa.xyz.astype(float)), cg.xyz, atol=2e-3)
    # a second run into the same folder is refused; --append extends it to 400 steps without duplicates
    assert main(argv + ["--ns", "0.0008"]) == 1
    assert "--append" in capsys.readouterr().err
    at_200 = (out / "checkpoint.chk").read_bytes()
    assert main(argv + ["--ns", "0.0016", "--append"]) == 0
    steps = [50, 100, 150, 200, 250, 300, 350, 400]
    assert _steps(out / "aa.dcd") == _steps(out / "cg.dcd") == steps
    rows = [line for line in (out / "cg_log.csv").read_text().splitlines() if not line.startswith("#")]
    assert [int(r.split(",")[0]) for r in rows] == steps
    # a crash after step 400 whose last checkpoint was at step 200: --append drops the frames and log rows after
    # the checkpoint and writes them again, so nothing is duplicated or missing
    (out / "checkpoint.chk").write_bytes(at_200)
    with pytest.warns(UserWarning, match="after step 200"):
        assert main(argv + ["--ns", "0.0016", "--append"]) == 0
    assert _steps(out / "aa.dcd") == _steps(out / "cg.dcd") == steps
    rows = [line for line in (out / "cg_log.csv").read_text().splitlines() if not line.startswith("#")]
    assert [int(r.split(",")[0]) for r in rows] == steps
    assert md.load(str(out / "aa.dcd"), top=str(out / "aa.pdb")).n_frames == 8
    # the python backend (openmm.PythonForce) runs the same potential
    assert main(argv + ["--ns", "0.0004", "--backend", "python", "--out", str(out.with_name("run_py"))]) == 0
    assert _steps(out.with_name("run_py") / "aa.dcd") == [50, 100]


def test_backmap_offline(pipeline, capsys):
    import mdtraj as md

    run = pipeline["root"] / "run"
    if not (run / "cg.dcd").exists():
        assert main(["run", "--potential", str(pipeline["potential"]), "--backmapper", str(pipeline["backmapper"]),
                     "--data", str(pipeline["aa"]), "--out", str(run), "--ns", "0.0008"]) == 0
    out = pipeline["root"] / "offline" / "aa_offline.dcd"
    assert main(["backmap", "--cg", str(run / "cg.dcd"), "--topology", str(run / "cg.pdb"), "--backmapper",
                 str(pipeline["backmapper"]), "--out", str(out), "--seed", "3"]) == 0
    n_cg = md.load(str(run / "cg.dcd"), top=str(run / "cg.pdb")).n_frames
    assert md.load(str(out), top=str(out.with_suffix(".pdb"))).n_frames == n_cg
    assert yaml.safe_load(out.with_name("aa_offline.config.yaml").read_text())["seed"] == 3
    # a CG dataset (HDF5) needs no topology; --stride thins it
    strided = pipeline["root"] / "offline" / "from_h5.dcd"
    assert main(["backmap", "--cg", str(pipeline["cg"]), "--backmapper", str(pipeline["backmapper"]),
                 "--stride", "50", "--mode", "library", "--out", str(strided)]) == 0
    assert md.load(str(strided), top=str(strided.with_suffix(".pdb"))).n_frames == 10
    assert main(["backmap", "--cg", str(run / "cg.dcd"), "--backmapper", str(pipeline["backmapper"]),
                 "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_backmap_relax_minimises_with_the_aa_system(pipeline, capsys):
    import mdtraj as md
    import openmm

    from openmm_backmap.data import AADataset

    strided = {}
    for relax in (0, 100):
        strided[relax] = pipeline["root"] / "relax" / f"relax{relax}.h5"
        assert main(["backmap", "--cg", str(pipeline["cg"]), "--backmapper", str(pipeline["backmapper"]),
                     "--stride", "100", "--relax", str(relax), "--data", str(pipeline["aa"]),
                     "--out", str(strided[relax])]) == 0
    with AADataset(pipeline["aa"]) as aa:
        system = aa.system
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies = {}
    for relax, path in strided.items():
        energies[relax] = []
        for xyz in md.load(str(path)).xyz.astype(float):
            context.setPositions(xyz)
            energies[relax].append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    assert len(energies[0]) == 5 and np.all(np.array(energies[100]) < np.array(energies[0])), energies
    assert main(["backmap", "--cg", str(pipeline["cg"]), "--backmapper", str(pipeline["backmapper"]),
                 "--relax", "100", "--out", str(pipeline["root"] / "relax" / "no_data.h5")]) == 1
    assert "--relax needs --data" in capsys.readouterr().err
    # --relax-md: a restrained Langevin run after the minimisation, at the dataset's temperature, with the
    # System's constraints satisfied again (the minimisation only approximates them with stiff bonds)
    thermal = pipeline["root"] / "relax" / "relax100_md50.h5"
    assert main(["backmap", "--cg", str(pipeline["cg"]), "--backmapper", str(pipeline["backmapper"]),
                 "--stride", "100", "--relax", "100", "--relax-md", "50", "--data", str(pipeline["aa"]),
                 "--out", str(thermal)]) == 0
    frames = {"min": md.load(str(strided[100])).xyz.astype(float), "md": md.load(str(thermal)).xyz.astype(float)}
    error = {}
    for key, xyz in frames.items():
        error[key] = max(abs(np.linalg.norm(xyz[:, i] - xyz[:, j], axis=-1) / length._value - 1).max()
                         for i, j, length in (system.getConstraintParameters(c)
                                              for c in range(system.getNumConstraints())))
    assert system.getNumConstraints() > 0 and error["md"] < 1e-4 < error["min"], error
    assert main(["backmap", "--cg", str(pipeline["cg"]), "--backmapper", str(pipeline["backmapper"]),
                 "--relax-md", "50", "--data", str(pipeline["aa"]), "--out", str(thermal.with_name("x.h5"))]) == 1
    assert "--relax-md runs after the minimisation" in capsys.readouterr().err
    # run --relax: the same CG run (same seed) writes AA frames with lower OpenMM energies
    runs = {}
    for relax in (0, 50):
        runs[relax] = pipeline["root"] / "relax" / f"run_relax{relax}"
        assert main(["run", "--potential", str(pipeline["potential"]), "--backmapper", str(pipeline["backmapper"]),
                     "--data", str(pipeline["aa"]), "--out", str(runs[relax]), "--ns", "0.0008",
                     "--relax", str(relax)]) == 0
    np.testing.assert_allclose(md.load(str(runs[0] / "cg.dcd"), top=str(runs[0] / "cg.pdb")).xyz,
                               md.load(str(runs[50] / "cg.dcd"), top=str(runs[50] / "cg.pdb")).xyz, atol=1e-5)
    run_energies = {}
    for relax, folder in runs.items():
        run_energies[relax] = []
        for xyz in md.load(str(folder / "aa.dcd"), top=str(folder / "aa.pdb")).xyz.astype(float):
            context.setPositions(xyz)
            run_energies[relax].append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    assert np.all(np.array(run_energies[50]) < np.array(run_energies[0])), run_energies
    assert yaml.safe_load((runs[50] / "run.config.yaml").read_text())["relax"] == 50


def test_evaluate_writes_report(pipeline, capsys):
    pytest.importorskip("openmm_backmap.evaluation")
    run = pipeline["root"] / "run"
    if not (run / "aa.dcd").exists():
        assert main(["run", "--potential", str(pipeline["potential"]), "--backmapper", str(pipeline["backmapper"]),
                     "--data", str(pipeline["aa"]), "--out", str(run), "--ns", "0.0016"]) == 0
    out = pipeline["root"] / "evaluation"
    assert main(["evaluate", "--reference", str(pipeline["aa"]), "--backmapped", str(run / "aa.dcd"),
                 "--cg", str(run / "cg.dcd"), "--cg-log", str(run / "cg_log.csv"),
                 "--backmapper", str(pipeline["backmapper"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Bond score" in printed and f"report: {(out / 'report.html').resolve()}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics and (out / "report.html").exists() and (out / "evaluate.config.yaml").exists()


def test_bench_runs_the_checkout_suite_or_says_why_not(tmp_path, monkeypatch, capsys):
    fake_pkg = tmp_path / "src" / "openmm_backmap"
    fake_pkg.mkdir(parents=True)
    monkeypatch.setattr(cli, "__file__", str(fake_pkg / "cli.py"))
    assert main(["bench"]) == 1
    assert "source checkout" in capsys.readouterr().err
    bench = tmp_path / "src" / "benchmarks"
    bench.mkdir()
    (bench / "run_all.py").write_text(
        "import sys, pathlib\npathlib.Path(sys.argv[0]).with_name('args.txt').write_text(' '.join(sys.argv[1:]))\n")
    assert main(["bench", "--quick"]) == 1
    assert "no --quick option" in capsys.readouterr().err
    assert main(["bench", "--only", "energy", "data_writer"]) == 0
    assert (bench / "args.txt").read_text() == "--only energy data_writer"
    (bench / "run_all.py").write_text("import sys\n# --quick\nsys.exit(3)\n")
    assert main(["bench", "--quick"]) == 1
    assert "exit code 3" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# The demo, tiny
# ----------------------------------------------------------------------------------------------------

def test_demo_tiny_end_to_end_and_reuse(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--ns", "0.1", "--epochs-potential", "1", "--max-frames-potential", "400",
            "--epochs-backmapper", "1", "--epochs-baseline", "1", "--cg-ns", "0.003"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert [f"[{k}/8]" in printed for k in range(1, 9)] == [True] * 8
    assert printed.rstrip().endswith(str(out.resolve()))
    summary = json.loads((out / "summary.json").read_text())
    with AADataset(out / "aa_reference.h5") as aa:
        assert aa.n_frames == 500 == summary["aa"]["frames"]  # 100 ps every 0.2 ps
    with CGDataset(out / "cg_backbone-cb.h5") as cg:
        assert cg.n_atoms == 6 and cg.n_frames == 500
    assert 0.12 < summary["cg"]["bond_length_mean_std_nm"]["ACE:C-ALA:N"][0] < 0.145  # a peptide bond
    # 3 ps of CG MD at 4 fs, backmapped every 1 ps (250 steps)
    assert _steps(out / "aa.dcd") == [250, 500, 750]
    assert len(_steps(out / "aa_frame_based.dcd")) == 3  # offline: the same CG frames, backmapped by the baseline
    names = ["aa.pdb", "cg.dcd", "cg.pdb", "potential.pt", "backmapper.pt", "backmapper_frame_based.pt",
             "summary.md", "demo.config.yaml"]
    if importlib.util.find_spec("openmm_backmap.evaluation") is not None:
        names += ["report.html", "metrics.json"]
    for name in names:
        assert (out / name).exists(), name
    # a rerun reuses every finished step
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("reused") >= 4 and "already holds 750 steps" in printed
