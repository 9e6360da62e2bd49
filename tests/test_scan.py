"""A head over a protein's windows: the windows, domains from runs of windows, the background's member rule, raised thresholds."""

import numpy as np
import pytest

from distill.inference.scan import Scan, segment, spans


def test_windows_cover_the_protein_every_stride_with_the_last_flush_with_the_end():
    assert spans(200, 96, 32).tolist() == [[0, 96], [32, 128], [64, 160], [96, 192], [104, 200]]
    assert spans(160, 96, 32).tolist() == [[0, 96], [32, 128], [64, 160]]  # the last already ends at 160
    assert spans(50, 96, 32).tolist() == [[0, 50]]  # shorter than a window: the whole protein


def test_runs_of_windows_with_one_top_label_above_its_threshold_become_domains():
    # windows of 96 every 32 over 256 residues: A A B(weak) - C C ; C's own threshold is higher than A's
    s = Scan(
        spans(256, 96, 32),
        np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.5, 0.4], [0.2, 0.2, 0.6], [0.05, 0.05, 0.9], [0.0, 0.1, 0.95]]),
    )
    assert s.spans.tolist()[-1] == [160, 256] and len(s.spans) == 6
    thresholds = {"A": 0.7, "B": 0.7, "C": 0.85}
    got = [(d.start, d.end, d.label, d.score) for d in segment(s, ["A", "B", "C"], thresholds.__getitem__)]
    assert got == [(1, 128, "A", 0.9), (129, 256, "C", 0.95)]  # C's 0.6 window is below C's threshold
    np.testing.assert_allclose(s.best, [0.9, 0.5, 0.95])


def test_a_label_hit_twice_in_windows_that_do_not_overlap_is_two_domains():
    s = Scan(spans(320, 96, 32), np.array([[0.9, 0.1]] + [[0.1, 0.2]] * 5 + [[0.9, 0.1]]))
    assert len(s.spans) == 8 and s.spans.tolist()[-1] == [224, 320]
    s.probabilities = np.r_[s.probabilities, [[0.95, 0.05]]]
    got = [(d.start, d.end) for d in segment(s, ["A", "B"], lambda label: 0.5)]
    assert got == [(1, 96), (193, 320)]


def test_raised_thresholds_sit_ten_times_the_odds_above_the_best_non_member():
    from distill.recipes.finetune_calibration import NEVER, _raised

    assert _raised(0.5) == pytest.approx(10 / 11)  # odds 1 -> 10
    assert _raised(0.9) == pytest.approx(90 / 91)  # odds 9 -> 90
    assert _raised(1.0) == NEVER and _raised(np.float64(1 - 1e-12)) == NEVER  # float32 has nothing above 1


def test_a_background_protein_is_a_presumed_member_only_when_it_aligns_strongly_to_a_labelled_sequence():
    pytest.importorskip("pyopal")
    from distill.inference.members import presumed_members, strongest

    rng = np.random.default_rng(0)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    labelled = ["".join(rng.choice(letters, 150)) for _ in range(6)]
    labels = ["A", "A", "B", "B", "C", "C"]
    member = "MSTK" + labelled[2][10:140] + "GGLE"  # a domain of B inside a longer protein
    stranger = "".join(rng.choice(letters, 200))
    got = presumed_members(labelled, labels, [member, stranger])
    assert got == [{"B"}, set()]
    assert max(strongest(labelled, labels, [stranger])[0].values()) < -np.log(1e-5)


def test_a_missing_optional_dependency_is_one_error_line_naming_the_extra(monkeypatch, tmp_path):
    import sys

    from conftest import pfam_examples, write_labelled
    from typer.testing import CliRunner

    from distill.cli.app import app

    monkeypatch.setitem(sys.modules, "pyopal", None)  # as if it were not installed
    data = write_labelled(tmp_path / "d.fasta", [r for rs in pfam_examples(("PF00004", "PF00005")).values() for r in rs[:10]])
    (tmp_path / "bg.fasta").write_text(">a\nMKTAYIAKQR\n>b\nMSTNPKPQRK\n")
    res = CliRunner().invoke(app, ["finetune", "random:small", "--data", str(data), "--task", "pfam", "--out", str(tmp_path / "r"),
                                   "--background", str(tmp_path / "bg.fasta")])  # fmt: skip
    assert res.exit_code == 2 and "alignment re-ranking needs pyopal: pip install 'esm-distill[index]'" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "r").exists()
