import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, REPO
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core.bundle import save_bundle
from distill.core.config import ModelConfig
from distill.core.fasta import read_fasta
from distill.core.model import ESM
from distill.inference.sequences import WINDOW, windows
from distill.recipes.annotate import Options, annotate

runner = CliRunner()
REAL = [(r.id, r.sequence) for r in read_fasta(EXAMPLES / "valid.fasta")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny student with a Pfam head (probed on the bundled sample) and its ONNX export."""
    root = tmp_path_factory.mktemp("ann")
    torch.manual_seed(0)
    b = save_bundle(root / "student", ESM(ModelConfig(2, 32, 4, 64)), "custom")
    # a random 32-dim model calls nothing at the default rule; a lower target gives the tests calls on both sides of it
    probe = ["probe", str(b), "--data", str(EXAMPLES / "pfam.fasta"), "--task", "pfam", "--min-per-class", "5"]
    res = runner.invoke(app, [*probe, "--target-precision", "0.5", "--confidence", "0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", "onnx", str(b), "-o", str(root / "s.onnx"), "--heads"])
    assert res.exit_code == 0, res.output
    return b, root / "s.onnx"


def write_input(path, records):
    path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in records))
    return path


def test_windows_cover_long_sequences_with_overlap():
    assert windows(100) == [(0, 100)]
    assert windows(WINDOW) == [(0, WINDOW)]
    assert windows(2500) == [(0, 1022), (511, 1533), (1022, 2044), (1478, 2500)]


def test_every_record_gets_a_row_in_input_order_with_errors_and_long_policy(bundle, tmp_path):
    b, _ = bundle
    records = REAL[:30] + [("bad", "MKVJJ"), ("empty", ""), ("long", REAL[0][1] * 12)] + REAL[30:40]
    fasta = write_input(tmp_path / "in.fa", records)
    fasta.write_text("ACDE\n" + fasta.read_text() + ">\nMKV\n")  # residues before any header; a header without an id
    out = tmp_path / "calls.tsv"
    res = runner.invoke(app, ["annotate", str(fasta), "--model", str(b), "-o", str(out), "--top-k", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == ["id", "length", "pfam_label_1", "pfam_prob_1", "pfam_label_2", "pfam_prob_2", "status", "message"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows][1:44] == [rid for rid, _ in records]
    assert len(rows) == 45 and "45 records: 41 ok, 4 error" in res.output
    by_id = {r[0]: r for r in rows}
    assert by_id["bad"][6] == "error" and "illegal residue 'J'" in by_id["bad"][7] and by_id["bad"][2] == ""
    assert by_id["empty"][6] == "error" and "empty sequence" in by_id["empty"][7]
    assert by_id["long"][6] == "ok" and by_id["long"][7] == "windows: 3 x 1022 residues (stride 511), averaged"
    assert rows[0][6] == rows[-1][6] == "error" and "no '>' header" in rows[0][7] and "no record id" in rows[-1][7]
    from distill.core.heads import heads_of

    threshold = heads_of(b)["pfam"].min_probability  # the probe's calibrated no-call
    assert 0 < threshold < 1
    for r in rows:
        if r[6] == "ok":
            assert float(r[3]) >= float(r[5])
            for label, p in ((r[2], float(r[3])), (r[4], float(r[5]))):
                assert label == "-" if p < threshold else label.startswith("PF"), (label, p, threshold)
    crop = tmp_path / "crop.tsv"
    res = runner.invoke(app, ["annotate", str(fasta), "--model", str(b), "-o", str(crop), "--long", "crop", "--quiet"])
    assert res.exit_code == 0
    assert "cropped: leading 1022 of 1620 residues" in crop.read_text()


def test_a_single_head_folder_is_named_by_its_task_not_its_folder(bundle, tmp_path):
    import shutil

    b, _ = bundle
    head = shutil.copytree(b / "heads" / "pfam", tmp_path / "my-probe")  # as `distill probe MODEL --out my-probe` writes it
    fasta = write_input(tmp_path / "in.fa", REAL[:3])
    res = runner.invoke(app, ["annotate", str(fasta), "--model", str(b), "--head-dir", str(head), "-o", str(tmp_path / "o.tsv"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o.tsv").read_text().splitlines()[0].split("\t")[2] == "pfam_label_1"


def test_onnx_and_torch_backends_agree_and_embeddings_files_are_standard(bundle, tmp_path):
    import h5py
    import pyarrow.parquet as pq

    from distill.inference import resolve

    b, graph = bundle
    fasta = write_input(tmp_path / "in.fa", REAL[:25])
    s1 = annotate(fasta, resolve(str(b)), tmp_path / "torch.tsv", Options(embeddings=tmp_path / "e.h5", quiet=True))
    s2 = annotate(fasta, resolve(graph), tmp_path / "onnx.tsv", Options(embeddings=tmp_path / "e.parquet", quiet=True))
    annotate(fasta, resolve(graph), tmp_path / "npy.tsv", Options(embeddings=tmp_path / "e.npy", quiet=True))
    assert s1.ok == s2.ok == 25
    t1 = [line.split("\t") for line in (tmp_path / "torch.tsv").read_text().splitlines()[1:]]
    t2 = [line.split("\t") for line in (tmp_path / "onnx.tsv").read_text().splitlines()[1:]]
    assert [r[2] for r in t1] == [r[2] for r in t2]
    np.testing.assert_allclose([float(r[3]) for r in t1], [float(r[3]) for r in t2], atol=2e-4)

    direct = {rid: e.sequence for (rid, _), e in zip(REAL[:25], resolve(graph).embed([s for _, s in REAL[:25]]), strict=True)}
    with h5py.File(tmp_path / "e.h5") as f:  # one dataset per id, '/' escaped, original id kept
        assert len(f) == 25 and json.loads(f.attrs["esm_distill"])["dim"] == 32
        for name in f:
            np.testing.assert_allclose(f[name][()], direct[f[name].attrs["original_id"]], atol=1e-5)
        assert REAL[0][0].replace("/", "%2F") in f
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column("id").to_pylist() == [rid for rid, _ in REAL[:25]]
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), np.stack(list(direct.values())), atol=1e-5)
    assert json.loads(table.schema.metadata[b"esm_distill"])["model"] == "s.onnx"
    arr = np.load(tmp_path / "e.npy")
    assert arr.shape == (25, 32) and (tmp_path / "e.ids.txt").read_text().split() == [rid for rid, _ in REAL[:25]]


def test_refuses_to_overwrite_and_checks_resume_settings(bundle, tmp_path):
    b, graph = bundle
    fasta = write_input(tmp_path / "in.fa", REAL[:5])
    out = tmp_path / "c.tsv"
    assert runner.invoke(app, ["annotate", str(fasta), "--model", str(graph), "-o", str(out), "--quiet"]).exit_code == 0
    res = runner.invoke(app, ["annotate", str(fasta), "--model", str(graph), "-o", str(out), "--quiet"])
    assert res.exit_code == 2 and "exists; continue it with --resume" in res.output
    res = runner.invoke(app, ["annotate", str(fasta), "--model", str(graph), "-o", str(out), "--resume", "--quiet"])
    assert res.exit_code == 0 and "already complete (5 records)" in res.output
    res = runner.invoke(app, ["annotate", str(fasta), "--model", str(graph), "-o", str(out), "--resume", "--top-k", "3", "--quiet"])
    assert res.exit_code == 2 and "belongs to a different run" in res.output
    res = runner.invoke(app, ["annotate", str(fasta), "--model", str(graph), "-o", str(tmp_path / "x.tsv"), "--tasks", "scope"])
    assert res.exit_code == 2 and "has no scope head" in res.output
    res = runner.invoke(app, ["annotate", str(fasta), "-o", str(tmp_path / "y.tsv")])
    assert res.exit_code == 2 and "exactly one of --model" in res.output
    res = runner.invoke(app, ["annotate", str(fasta), "--model", str(graph), "-o", str(tmp_path / "z.tsv"), "--embeddings", "e.csv"])
    assert res.exit_code == 2 and "--embeddings must end in one of .h5" in res.output


def _run(spawn, args, env=None):
    return spawn([sys.executable, "-m", "distill", "annotate", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_resume_after_sigkill_gives_identical_files(bundle, spawn, tmp_path):
    _, graph = bundle
    rng = np.random.default_rng(0)
    records = [(f"r{i}", REAL[j][1]) for i, j in enumerate(rng.integers(0, len(REAL), 3000))]
    fasta = write_input(tmp_path / "big.fa", records)
    common = ["--model", str(graph), "--top-k", "2", "--chunk-records", "100", "--quiet"]
    ref = _run(spawn, [str(fasta), "-o", str(tmp_path / "ref.tsv"), "--embeddings", str(tmp_path / "ref.h5"), *common])
    assert ref.wait(timeout=300) == 0, ref.stdout.read().decode()

    out, progress = tmp_path / "run.tsv", tmp_path / "run.tsv.progress.json"
    proc = _run(spawn, [str(fasta), "-o", str(out), "--embeddings", str(tmp_path / "run.h5"), *common])
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.is_file() and json.loads(progress.read_text())["chunks"] >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(progress.read_text())
    assert not state["complete"] and 0 < state["records"] < 3000
    with open(out, "a") as f:
        f.write("r99999\t12\tPF0")  # what a kill in the middle of a write leaves: resume must not trust it
    res = _run(spawn, [str(fasta), "-o", str(out), "--embeddings", str(tmp_path / "run.h5"), "--resume", *common])
    assert res.wait(timeout=300) == 0, res.stdout.read().decode()
    assert out.read_bytes() == (tmp_path / "ref.tsv").read_bytes()
    import h5py

    with h5py.File(tmp_path / "ref.h5") as a, h5py.File(tmp_path / "run.h5") as b:
        assert list(a) == list(b) and len(a) == 3000
        for name in list(a)[::97]:
            np.testing.assert_array_equal(a[name][()], b[name][()])


def test_memory_stays_bounded_as_the_input_grows(bundle, tmp_path):
    """Peak RSS of a 10x larger input grows by less than a few MB: records are streamed, not held."""
    _, graph = bundle
    rng = np.random.default_rng(1)

    def peak_rss(n: int) -> int:
        fasta = write_input(tmp_path / f"in{n}.fa", [(f"r{i}", REAL[j][1][:60]) for i, j in enumerate(rng.integers(0, len(REAL), n))])
        code = (
            "import resource, sys; from distill.cli.app import app\n"
            f"try: app([{str(fasta)!r}, '--model', {str(graph)!r}, '-o', {str(tmp_path / f'o{n}.tsv')!r}, '--quiet'], prog_name='distill')\n"
            "except SystemExit: pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        code = code.replace("app([", "app(['annotate', ")
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
        assert res.returncode == 0, res.stderr
        assert len((tmp_path / f"o{n}.tsv").read_text().splitlines()) == n + 1
        return int(res.stdout.split()[-1])  # KiB

    small, large = peak_rss(2_000), peak_rss(20_000)
    assert large - small < 20 * 1024, (small, large)


def test_an_empty_fasta_is_refused_like_fit_refuses_it(bundle, tmp_path):
    b, _ = bundle
    empty = tmp_path / "empty.fasta"
    empty.write_text("\n")
    out = tmp_path / "calls.tsv"
    res = runner.invoke(app, ["annotate", str(empty), "--model", str(b), "-o", str(out), "--quiet"])
    assert res.exit_code == 2 and "holds no FASTA records; nothing to annotate" in res.output
    assert not out.exists() and not (tmp_path / "calls.tsv.progress.json").exists()


def test_shards_then_merge_equal_one_run_and_bad_shard_sets_are_refused(bundle, tmp_path):
    _, graph = bundle
    records = REAL[:20] + [("bad", "MKVJJ")] + REAL[20:41]
    fasta = write_input(tmp_path / "in.fa", records)
    fasta.write_text("ACDE\n" + fasta.read_text() + ">\nMKV\n")  # malformed records count as rows in every shard's numbering
    base = ["annotate", str(fasta), "--model", str(graph), "--top-k", "2", "--chunk-records", "4", "--quiet"]
    res = runner.invoke(app, [*base, "-o", str(tmp_path / "one.tsv"), "--embeddings", str(tmp_path / "one.npy")])
    assert res.exit_code == 0, res.output
    for i in range(3):
        out = tmp_path / f"s{i}.tsv"
        res = runner.invoke(app, [*base, "-o", str(out), "--embeddings", str(tmp_path / f"s{i}.npy"), "--shard", f"{i}/3"])
        assert res.exit_code == 0, res.output
    assert [len((tmp_path / f"s{i}.tsv").read_text().splitlines()) - 1 for i in range(3)] == [14, 15, 15]
    res = runner.invoke(
        app,
        [
            "merge",
            *(str(tmp_path / f"s{i}.tsv") for i in (2, 0, 1)),
            "-o",
            str(tmp_path / "m.tsv"),
            "--embeddings",
            str(tmp_path / "m.npy"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.tsv").read_bytes() == (tmp_path / "one.tsv").read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), np.load(tmp_path / "one.npy"))
    assert (tmp_path / "m.ids.txt").read_text() == (tmp_path / "one.ids.txt").read_text()
    refusals = {
        "missing": ([0, 1], "shard(s) 2/3 missing"),
        "duplicated": ([0, 1, 1, 2], "shard 1/3 is given twice"),
        "unsharded": ([0, 1, "one"], "cut into different numbers of shards ([1, 3])"),
    }
    for name, (parts, message) in refusals.items():
        paths = [str(tmp_path / (f"s{p}.tsv" if isinstance(p, int) else f"{p}.tsv")) for p in parts]
        res = runner.invoke(app, ["merge", *paths, "-o", str(tmp_path / f"{name}.tsv")])
        assert res.exit_code == 2 and message in res.output, (name, res.output)
    other = write_input(tmp_path / "other.fa", records[:-1])  # another input file: another job
    res = runner.invoke(
        app,
        [
            "annotate",
            str(other),
            "--model",
            str(graph),
            "--top-k",
            "2",
            "--chunk-records",
            "4",
            "--quiet",
            "-o",
            str(tmp_path / "x.tsv"),
            "--shard",
            "2/3",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["merge", str(tmp_path / "s0.tsv"), str(tmp_path / "s1.tsv"), str(tmp_path / "x.tsv"), "-o", str(tmp_path / "f.tsv")]
    )
    assert res.exit_code == 2 and "belongs to another job" in res.output
    res = runner.invoke(app, [*base, "-o", str(tmp_path / "bad.tsv"), "--shard", "3/3"])
    assert res.exit_code == 2 and "I must be in 0..2" in res.output
