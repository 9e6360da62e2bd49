"""Benchmark scripts that do not run in CI: the GPU one in --smoke mode, the proteome scoring by hand, the few-shot SCOPe draws."""

import subprocess
import sys

from conftest import REPO


def test_gpu_benchmark_script_runs_in_smoke_mode():
    res = subprocess.run(
        [sys.executable, "benchmarks/gpu_train_throughput.py", "--smoke"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "A. teacher inference: fair-esm" in res.stdout and "B. student training" in res.stdout


def test_proteome_scoring_by_hand(tmp_path):
    """benchmarks/proteome_calls.py's score: agreement, recall and domain overlap against HMMER, on four proteins."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from proteome_calls import overlap, score, wilson

    truth = {  # protein -> HMMER domain hits (label, i-Evalue, envelope from, to)
        "p1": [("A", 1e-20, 10, 110)],
        "p2": [("B", 1e-3, 1, 80)],  # agrees at 0.01, not at 1e-5
        "p3": [("C", 1e-8, 5, 60)],  # HMMER-assigned, not called: a recall miss
    }
    head = "id\tlength\tref_call\tstatus\n"
    (tmp_path / "c.tsv").write_text(head + "p1\t200\tA\tok\np2\t90\tB\tok\np3\t70\t-\tok\np4\t50\tA\tok\n")
    doms = "id\tdomain\tstart\tend\tlabel\tverdict\n"
    doms += "p1\t1\t20\t100\tA\tcall\np2\t1\t70\t150\tB\tcall\np4\t1\t1\t50\tA\tcall\np3\t1\t5\t60\tC\trelated\n"
    (tmp_path / "c.domains.tsv").write_text(doms)
    r = score(tmp_path / "c.tsv", truth, ["p1", "p2", "p3", "p4"])
    # calls p1 A (right), p2 B (right at 0.01 only), p4 A (HMMER finds nothing): 2/3 agree at 0.01, 1/3 at 1e-5
    assert (r["calls"], r["calls_on_hmmer_negative"], r["hmmer_assigned_1e-5"]) == (3, 1, 2)
    assert r["agree_0.01"] == 2 / 3 and r["agree_1e-05"] == 1 / 3 and r["recall_1e-5"] == 1 / 2  # p1 of {p1, p3}
    # domain calls p1, p2, p4 (p3's is related): agreed p1 (20-100 inside 10-110: overlap 1) and p2 (70-150 vs 1-80:
    # 11 shared of the shorter 80 -> 0.1375, under half)
    assert overlap((70, 150), (1, 80)) == 11 / 80
    assert r["domain_calls"] == 3 and r["domain_agree_0.01"] == 2 / 3 and r["domain_overlap_50"] == 1 / 2
    assert wilson(0, 0) == [0.0, 1.0] and wilson(15, 27) == [0.373, 0.724]
    # a head's calls: its label column, and only the domain rows whose source is the head's task
    (tmp_path / "h.tsv").write_text("id\tlength\tpfam_label_1\tpfam_prob_1\tstatus\n" + "p1\t200\tA\t0.99\tok\np2\t90\t-\t0.2\tok\n")
    doms = "id\tdomain\tstart\tend\tlabel\tverdict\tsource\n" + "p1\t1\t20\t100\tA\tcall\tpfam\np1\t2\t20\t100\tA\tcall\treference\n"
    (tmp_path / "h.domains.tsv").write_text(doms)
    h = score(tmp_path / "h.tsv", truth, ["p1", "p2", "p3", "p4"], "pfam_label_1")
    assert (h["calls"], h["agree_0.01"], h["recall_1e-5"], h["domain_calls"], h["domain_overlap_50"]) == (1, 1.0, 1 / 2, 1, 1.0)


def test_few_shot_scope_settings_keep_big_superfamilies_and_one_test_set(tmp_path, monkeypatch):
    """benchmarks/few_shot.py's ``scopeN``: superfamilies with at least 60 domains only, 10 test domains each drawn once
    (the same at every N and seed), N training domains each from the rest, headers keeping the full sccs."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import few_shot

    sizes = {"a.1.1": 61, "b.2.2": 60, "c.3.3": 59}  # c.3.3 is one short of 60
    records = [(f"d{sf}{i}", sf + (".1" if i % 2 else ".2")) for sf, n in sizes.items() for i in range(n)]
    scope = tmp_path / "scope.fa"
    scope.write_text("".join(f">{rid} {sccs} (A:) x\nmkv{'l' * (i % 7)}\n" for i, (rid, sccs) in enumerate(records)))
    monkeypatch.setattr(few_shot, "SCOPE", scope)
    data = {(n, seed): few_shot.make_data(tmp_path, f"scope{n}", seed) for n, seed in ((5, 0), (5, 1), (20, 0))}
    tests = {key: few_shot.read(test, "scope") for key, (_, test) in data.items()}
    assert tests[(5, 0)] == tests[(5, 1)] == tests[(20, 0)] and len(tests[(5, 0)]) == 20
    for (n, seed), (train, _) in data.items():
        rows = few_shot.read(train, "scope")
        assert sorted({r[2] for r in rows}) == ["a.1.1", "b.2.2"] and len(rows) == 2 * n
        assert not {r[0] for r in rows} & {r[0] for r in tests[(n, seed)]}
        assert all(line.split()[1].count(".") == 3 for line in train.read_text().splitlines() if line.startswith(">"))
    assert {r[0] for r in few_shot.read(data[(5, 0)][0], "scope")} != {r[0] for r in few_shot.read(data[(5, 1)][0], "scope")}


def test_real_teacher_summary_keeps_the_last_summary_and_pairs_gains_by_seed(tmp_path):
    """benchmarks/real_teacher.py's summary: figures of tables no longer on disk come from the last summary; the
    tables on disk add to them; gains are paired by seed (mean and 95% t interval)."""
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    from real_teacher import summary

    (tmp_path / "summary-scope.json").write_text(json.dumps({"random": {"0": 0.20, "1": 0.22}, "vanilla": {"0": 0.18}}))
    table = tmp_path / "eval-scope-s1-vanilla"
    table.mkdir()
    rows = [{"spec": "random:small@1", "accuracy": 0.22}, {"spec": str(tmp_path / "students" / "vanilla-s1" / "student"), "accuracy": 0.19}]
    (table / "results.json").write_text(json.dumps({"rows": rows}))
    text = summary(tmp_path, "scope", [1])
    kept = json.loads((tmp_path / "summary-scope.json").read_text())
    assert kept == {"random": {"0": 0.20, "1": 0.22}, "vanilla": {"0": 0.18, "1": 0.19}}
    # vanilla minus random: -0.02 and -0.03 -> mean -0.025, sd 0.00707, half-width 12.706 * 0.005 = 0.0635
    assert "| vanilla | 2 | 0.185 | -0.025 [-0.089, +0.039] | - |" in text
