import json

import pytest
from conftest import EXAMPLES, write_fasta

from distill.core.config import SweepConfig
from distill.core.errors import UserError
from distill.core.fasta import read_fasta
from distill.recipes.sweep.grid import grid, run_sweep
from distill.recipes.sweep.merge import merge_stages

TEACHER = EXAMPLES / "teacher" / "tiny_esm1b_t4_192.pt"


def test_grid_trains_vanilla_once_per_preset_and_names_runs_like_the_study():
    cfg = SweepConfig(out="o", data="d", teacher="t", presets=["small", "medium"], tasks={}, temperatures=[1.0, 2.0], lambdas=[0.0, 0.5])
    names = [r[0] for r in grid(cfg)]
    assert names == [
        "Student-h128-L8-vanilla", "Student-h128-L8-T1.0", "Student-h128-L8-T2.0",
        "Student-h256-L10-vanilla", "Student-h256-L10-T1.0", "Student-h256-L10-T2.0",
    ]  # fmt: skip
    assert [r[0] for r in grid(SweepConfig(**{**cfg.__dict__, "lambdas": [0.3, 0.7]}))][:2] == [
        "Student-h128-L8-T1.0-lam0.3",
        "Student-h128-L8-T1.0-lam0.7",
    ]


def test_the_shared_teacher_cache_holds_one_masking_per_epoch_of_the_longest_preset():
    from distill.recipes.sweep.grid import cache_views

    cfg = SweepConfig(out="o", data="d", teacher="t", presets=["small", "medium"], tasks={})
    assert cache_views(cfg) == 20  # study epochs: small 10, medium 20; a small-only stage reuses the same cache
    assert cache_views(SweepConfig(**{**cfg.__dict__, "presets": ["small"]})) == 10
    assert cache_views(SweepConfig(**{**cfg.__dict__, "epochs": 3})) == 3


@pytest.mark.parametrize("config", sorted((EXAMPLES.parent / "benchmarks").glob("sweep*.toml")), ids=lambda p: p.name)
def test_the_shipped_sweep_configs_parse(config):
    cfg = SweepConfig.from_toml(config)  # a typo'd key or preset in a benchmark config fails here, not hours into a grid
    assert cfg.presets and cfg.tasks


def test_a_stage_keeps_the_run_names_of_the_whole_grid_and_names_what_it_does_not_know(tmp_path):
    from distill.core.errors import UserError
    from distill.recipes.sweep.grid import stage

    config = tmp_path / "s.toml"
    cfg = SweepConfig(
        out="o", data="d", teacher="t", presets=["small", "medium"], tasks={}, lambdas=[0.0, 0.5], data_sizes=[1000], seeds=[0, 1]
    )
    runs, name = stage(cfg, ["medium"], ["1000"], config)
    assert name == "medium-n1000"
    assert [r.name for r in runs] == [r.name for r in grid(cfg) if r.preset == "medium" and r.size == 1000]  # later stages resume these
    assert [r.name for r in runs] == [f"Student-h256-L10-{kind}-n1000-s{s}" for s in (0, 1) for kind in ("vanilla", "T2.0")]
    assert stage(cfg, None, ["all"], config)[1] == "nall" and {r.size for r in stage(cfg, None, ["all"], config)[0]} == {None}
    assert stage(cfg, None, None, config) == (grid(cfg), "")
    with pytest.raises(UserError, match=r"--preset large: not among the presets of .*s.toml \(small, medium\)"):
        stage(cfg, ["large", "small"], None, config)
    with pytest.raises(UserError, match=r"--size 500: not among the data sizes of .*s.toml \(1000, all\)"):
        stage(cfg, None, ["500"], config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("out = 'x'\n[[", "is not valid TOML"),
        (
            "out = 'x'\ndata = 'd'\nteacher = 't'\npresets = ['small']\n[tasks.pfam]\ndata = ['p']\n[fit]\nlearning_rate = 1\n",
            "[fit] has unknown settings ['learning_rate']",
        ),
        ("out = 'x'\ndata = 'd'\nteacher = 't'\npresets = ['huge']\n[tasks.pfam]\ndata = ['p']\n", "unknown preset 'huge'"),
        (
            "out = 'x'\ndata = 'd'\nteacher = 't'\npresets = ['small']\n[tasks.\"go term\"]\ndata = ['p']\n",
            "task name 'go term' is not usable",
        ),
        ("out = 'x'\ndata = 'd'\npresets = ['small']\n", "missing required key 'teacher'"),
        ("out = 'x'\nepochz = 3\n", "unknown keys ['epochz']"),
        (
            "out = 'x'\ndata = 'd'\nteacher = 't'\npresets = ['small']\n[tasks.pfam]\ndata = ['p']\n[finetune.pfam]\ndata = 'p'\n",
            "[finetune.pfam] needs 'data' and 'test'",
        ),
    ],
)
def test_bad_sweep_configs_are_named(tmp_path, text, message):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        SweepConfig.from_toml(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_merge_reports_the_whole_grid_and_needs_probed_stages(tmp_path):
    from typer.testing import CliRunner

    from distill.cli.app import app

    config = tmp_path / "sweep.toml"
    config.write_text(f"out = '{tmp_path / 'out'}'\ndata = '{EXAMPLES / 'train.fasta'}'\nteacher = 't'\npresets = ['small']\n"
                      f"[tasks.pfam]\ndata = ['{EXAMPLES / 'pfam.fasta'}']\n")  # fmt: skip
    res = CliRunner().invoke(app, ["sweep", str(config), "--merge", "--size", "all"])
    assert res.exit_code == 2 and "--merge reports the whole grid: drop --preset / --size" in res.output
    with pytest.raises(UserError, match=r"no stage of .*out has probed pfam: run the stages first"):
        merge_stages(config)


def sweep_inputs(tmp_path, max_length: int, n_train: int, n_pfam: int):
    """Small training and validation FASTAs from the bundled sample and a labelled Pfam file for the sweep's probe
    (16 validation sequences: every run and every probed model computes perplexity on them)."""
    records = [(r.id, r.sequence) for r in read_fasta(EXAMPLES / "train.fasta") if len(r.sequence) < max_length][:n_train]
    valid = [(r.id, r.sequence) for r in read_fasta(EXAMPLES / "valid.fasta")][:16]
    labelled = [(f"{r.id} {r.description}", r.sequence) for r in list(read_fasta(EXAMPLES / "pfam.fasta"))[:n_pfam]]
    return tuple(write_fasta(tmp_path / f"{name}.fasta", recs) for name, recs in (("train", records), ("valid", valid), ("pfam", labelled)))


def test_sweep_trains_probes_reports_and_resumes_without_redoing(tmp_path, capsys):
    train, valid, pfam = sweep_inputs(tmp_path, max_length=120, n_train=48, n_pfam=90)
    labelled = [(f"{r.id} {r.description}", r.sequence) for r in read_fasta(pfam)]
    ft_train = write_fasta(tmp_path / "ft_train.fasta", [r for i, r in enumerate(labelled) if i % 4])
    ft_test = write_fasta(tmp_path / "ft_test.fasta", labelled[::4])
    config = tmp_path / "sweep.toml"
    config.write_text(
        f"out = '{tmp_path / 'report'}'\ndata = '{train}'\nvalid = '{valid}'\nteacher = '{TEACHER}'\n"
        "presets = ['small']\ntemperatures = [2.0]\nlambdas = [0.0, 0.5]\nepochs = 1\nteacher_cache = true\nbaselines = true\n"
        "[fit]\nbatch_size = 16\nquiet = true\n"
        f"[tasks.pfam]\ndata = ['{pfam}']\nmin_per_class = 5\n"
        f"[finetune.pfam]\ndata = '{ft_train}'\ntest = '{ft_test}'\nepochs = 1\nbatch_size = 16\nfolds = 0\n"  # calibration is not the subject
    )
    from rich.console import Console

    report = run_sweep(config, Console(stderr=True, soft_wrap=True))
    text = report.read_text()
    assert "| Model | Params | Accuracy | Precision | Recall | F1 |" in text
    for name in ("tiny_esm1b_t4_192", "Student-h128-L8-vanilla", "Student-h128-L8-T2.0", "random-h128-L8", "composition"):
        assert f"| {name} |" in text
    assert "Protocol: frozen-embedding linear probe" in text and "![t-SNE](pfam/tsne.png)" in text
    assert (tmp_path / "report" / "teacher-cache").is_dir()
    assert json.loads((tmp_path / "report" / "runs" / "Student-h128-L8-T2.0" / "student" / "config.json").read_text())["training"][
        "teacher_cache"
    ]
    weights = (tmp_path / "report" / "runs" / "Student-h128-L8-T2.0" / "student" / "model.safetensors").stat().st_mtime_ns

    section = text.split("## Fine-tuned calls")[1].split("## Time")[0]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in section.splitlines() if line.startswith("| Student")}
    assert set(rows) == {"Student-h128-L8-vanilla", "Student-h128-L8-T2.0"}
    assert all(0 <= float(v.strip(" |")) <= 1 for vals in rows.values() for v in vals)
    assert (tmp_path / "report" / "finetune" / "pfam" / "Student-h128-L8-T2.0" / "model" / "heads" / "pfam").is_dir()

    capsys.readouterr()
    staged = run_sweep(config, Console(stderr=True, soft_wrap=True), presets=["small"])  # a stage resumes the whole grid's cells
    assert staged == tmp_path / "report" / "stages" / "small" / "report.md"
    assert staged.read_text().startswith("# Distillation sweep: stage small") and (staged.parent / "pfam" / "results.md").is_file()
    err = capsys.readouterr().err
    assert "Student-h128-L8-vanilla: finished earlier, skipped" in err and "Student-h128-L8-T2.0: finished earlier, skipped" in err
    assert err.count("fine-tuned on pfam earlier, skipped") == 2
    assert (tmp_path / "report" / "runs" / "Student-h128-L8-T2.0" / "student" / "model.safetensors").stat().st_mtime_ns == weights

    config.write_text(config.read_text().replace("epochs = 1\nbatch_size = 16", "epochs = 2\nbatch_size = 16"))
    with pytest.raises(UserError, match=r"fine-tuned with other settings \(epochs differ from \[finetune.pfam\]\)"):
        run_sweep(config, Console(stderr=True, soft_wrap=True))  # a finished fine-tune of other settings is never reused


def test_subsets_are_nested_and_do_not_depend_on_the_file_order(tmp_path):
    from distill.recipes.sweep.grid import write_subsets

    records = [(r.id, r.sequence) for r in read_fasta(EXAMPLES / "train.fasta")][:60]
    ids = {}
    for name, recs in (("fwd", records), ("rev", records[::-1])):
        data = write_fasta(tmp_path / f"{name}.fasta", recs)
        cfg = SweepConfig(out=str(tmp_path / name), data=str(data), teacher="t", presets=["small"], tasks={}, data_sizes=[10, 25])
        subsets = write_subsets(cfg, tmp_path / name)
        ids[name] = {n: [r.id for r in read_fasta(p)] for n, (p, _) in subsets.items() if n}
        assert subsets[None][1] == 60 and {n: k for n, (_, k) in subsets.items()} == {None: 60, 10: 10, 25: 25}
    assert set(ids["fwd"][10]) <= set(ids["fwd"][25])  # nested
    assert ids["fwd"] == ids["rev"]  # membership and order from the ids alone


def test_paired_gains_and_intervals_match_a_hand_computation():
    from distill.recipes.sweep.stats import RunKey, log_log_slope, paired_differences, t_interval

    ci = t_interval([0.1, 0.2, 0.3])  # mean 0.2, sd 0.1, t(0.975, 2) = 4.302653 -> half-width 0.248414
    assert (round(ci.mean, 6), round(ci.sd, 6), round(ci.lo, 5), round(ci.hi, 5)) == (0.2, 0.1, -0.04841, 0.44841)
    values = {RunKey("small", 100, 1.0, 0.0, s): v for s, v in enumerate([10.0, 12.0, 11.0])}
    values |= {RunKey("small", 100, 2.0, 0.5, s): v for s, v in enumerate([9.0, 10.0, 10.5])}  # perplexity: lower is better
    ((key, gain),) = paired_differences(values, higher_is_better=False).items()
    assert key == RunKey("small", 100, 2.0, 0.5, -1) and [round(x, 6) for x in (gain.mean, gain.sd)] == [1.166667, 0.763763]
    slope = log_log_slope([1e3, 1e4, 1e5, 1e6], [1.0, 0.1, 0.01, 0.001])
    assert abs(slope.mean + 1) < 1e-9 and slope.n == 4


def test_fine_tuned_calls_join_the_paired_analysis():
    from distill.recipes.sweep.finetune import values_of
    from distill.recipes.sweep.stats import RunKey, paired_differences

    runs = [(1.0, 0.0, 0, 0.5, 0.4), (2.0, 0.5, 0, 0.7, 0.5), (1.0, 0.0, 1, 0.6, 0.5), (2.0, 0.5, 1, 0.6, 0.7)]  # T, lam, seed, acc, F1
    results = {"pfam": {f"r{i}/student": {"key": RunKey("small", 100, t, lam, seed), "accuracy": a, "f1_macro": f}
                        for i, (t, lam, seed, a, f) in enumerate(runs)}}  # fmt: skip
    values = values_of(results)
    assert sorted(values) == ["fine-tuned pfam F1 (macro)", "fine-tuned pfam accuracy"]
    (acc,) = paired_differences(values["fine-tuned pfam accuracy"]).values()  # gains 0.2 and 0.0
    (f1,) = paired_differences(values["fine-tuned pfam F1 (macro)"]).values()  # gains 0.1 and 0.2
    assert (round(acc.mean, 6), round(acc.sd, 6), round(f1.mean, 6), round(f1.sd, 6)) == (0.1, 0.141421, 0.15, 0.070711)


def test_a_two_size_two_seed_sweep_reports_paired_gains_and_resumes(tmp_path, capsys):
    from rich.console import Console

    train, valid, pfam = sweep_inputs(tmp_path, max_length=100, n_train=32, n_pfam=60)
    config = tmp_path / "sweep.toml"
    config.write_text(
        f"out = '{tmp_path / 'report'}'\ndata = '{train}'\nvalid = '{valid}'\nteacher = '{TEACHER}'\n"
        "presets = ['small']\ntemperatures = [2.0]\nlambdas = [0.0, 0.5]\nepochs = 1\ndata_sizes = [16]\nseeds = [0, 1]\nteacher_cache = true\n"
        f"[fit]\nbatch_size = 16\nquiet = true\n[tasks.pfam]\ndata = ['{pfam}']\nmin_per_class = 5\n"
    )
    console = Console(stderr=True, soft_wrap=True)
    run_sweep(config, console, sizes=["16"])  # the grid in two stages, then one report over both
    path, missing = merge_stages(config)  # half the grid: reported, and the other half named
    assert missing == [f"pfam/Student-h128-L8-{t}-nall-s{s}" for s in (0, 1) for t in ("vanilla", "T2.0")]
    assert "Not in this report yet" in path.read_text() and "| small | 16 | 2 | 0.5 | 2 |" in path.read_text()
    run_sweep(config, console, sizes=["all"])
    merged, missing = merge_stages(config)
    merged = merged.read_text()
    assert missing == [] and "Not in this report yet" not in merged
    assert merged.startswith("# Distillation sweep: the whole grid, merged from the stages n16, nall")
    assert "| small | 16 | 2 | 0.5 | 2 |" in merged and "| pfam F1 (macro) | small | 32 | 2 | 0.5 |" in merged
    assert "shrinks with data size:" in merged and (tmp_path / "report" / "gain_vs_md.png").is_file()
    staged = json.loads((tmp_path / "report" / "stages" / "nall" / "pfam" / "results.json").read_text())
    staged["protocol"] = staged["protocol"].replace("seed 0", "seed 7")
    (tmp_path / "report" / "stages" / "nall" / "pfam" / "results.json").write_text(json.dumps(staged))
    with pytest.raises(UserError, match="probed under another protocol"):
        merge_stages(config)

    text = run_sweep(config, console).read_text()  # the whole grid: every cell skipped, probed again, the same analysis
    assert "## Data size and seeds" in text and "| small | 16 | 2 | 0.5 | 2 |" in text
    assert "| perplexity | small | 16 | 2 | 0.5 |" in text and "| pfam F1 (macro) | small | 32 | 2 | 0.5 |" in text
    assert merged.split("## Data size and seeds")[1].split("![gain")[0] == text.split("## Data size and seeds")[1].split("![gain")[0]
    rows = [line.split(" | ")[0].strip("| ") for line in (tmp_path / "report" / "pfam" / "results.md").read_text().splitlines()]
    assert [r for r in rows if r.startswith("Student")] == [
        f"Student-h128-L8-{t}-n{n}-s{s}" for n in (16, "all") for s in (0, 1) for t in ("vanilla", "T2.0")
    ]  # each run its own row, named by its run directory
    # masks are keyed by the training seed, so each (size, seed) has its own teacher cache
    assert sorted(p.name for p in (tmp_path / "report" / "teacher-cache").iterdir()) == ["n16-s0", "n16-s1", "nall-s0", "nall-s1"]
    assert capsys.readouterr().err.count("finished earlier, skipped") == 8
