import json

import numpy as np
import pytest
import torch
from test_train import config, rows
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core import data
from distill.core.losses import residue_logits
from distill.recipes.fit import fit
from distill.recipes.teacher_cache import CacheMismatch, TeacherCache, load_teacher

runner = CliRunner()


def build(fasta, out, teacher, *extra: str) -> None:
    res = runner.invoke(app, ["teacher-cache", str(fasta), "-o", str(out), "--teacher", str(teacher), "--quiet", *extra])
    assert res.exit_code == 0, res.output


@pytest.fixture
def cache(small_fasta, tiny_esm1b, tmp_path):
    out = tmp_path / "cache"
    build(small_fasta, out, tiny_esm1b, "--views", "2", "--shard-size", "25")
    return out


def test_cache_holds_the_teachers_residue_logits_at_the_masked_positions(cache, small_fasta, tiny_esm1b):
    c = TeacherCache(cache)
    assert c.key.views == 2 and c.key.n_records == 60 and len(list(cache.glob("*.offsets.npy"))) == 2 * 3
    seqs = data.load_fasta(small_fasta)
    teacher, sha = load_teacher(str(tiny_esm1b), torch.device("cpu"))
    assert c.key.teacher_sha256 == sha
    for view in (0, 1):
        for i in (0, 31, 59):  # one record from each shard
            inp, labels = data.masked_example(seqs.seqs[i], 0, view, i, 0.15, train=True)
            batch = data.collate([(inp, labels)], [i])
            with torch.no_grad():
                live = residue_logits(teacher(batch.tokens)["logits"][batch.labels != data.IGNORE])
            torch.testing.assert_close(c.logits(view, [i]), live, atol=2e-2, rtol=1e-3)  # fp16 storage
    assert c.logits(2, [5]).equal(c.logits(0, [5]))  # epoch e uses view e mod K
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["complete"] and 0 < meta["bytes_per_residue_per_view"] < 12


def test_cached_run_equals_live_run_step_for_step(small_fasta, tiny_esm1b, tmp_path):
    build(small_fasta, tmp_path / "k1", tiny_esm1b, "--views", "1")
    live = fit(config(small_fasta, tmp_path / "live", tiny_esm1b, mask_views=1)).out
    cached = fit(config(small_fasta, tmp_path / "cached", tiny_esm1b, teacher_cache=str(tmp_path / "k1"))).out
    a, b = rows(live), rows(cached)
    assert len(a) == len(b) == 8
    assert [x["kd"] for x in b] == pytest.approx([x["kd"] for x in a], rel=2e-3)
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], rel=2e-3)
    card = json.loads((cached / "student" / "config.json").read_text())["training"]
    assert card["teacher"] == str(tiny_esm1b) and card["teacher_cache"] == str(tmp_path / "k1")


def test_one_cache_serves_every_student_of_a_sweep(cache, small_fasta, tiny_esm1b, tmp_path):
    for name, kw in {"t05": dict(temperature=0.5), "lam1": dict(lam=1.0), "wide": dict(dim=64, heads=4, ffn=128)}.items():
        res = fit(config(small_fasta, tmp_path / name, tiny_esm1b, teacher_cache=str(cache), epochs=1, **kw))
        assert res.completed and all(r["kd"] > 0 for r in rows(res.out))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(seed=1), "seed: cache has 0, run has 1"),
        (dict(mask_rate=0.2), "mask_rate: cache has 0.15, run has 0.2"),
        (dict(mask_views=3), "views: cache has 2, run has 3"),
        (dict(teacher="esm2_t6_8M_UR50D"), "differs from the cache's teacher"),
        (dict(lam=0.0), "--lam 0 trains without a teacher"),
    ],
)
def test_mismatched_settings_are_refused(change, message, cache, small_fasta, tiny_esm1b, tmp_path):
    teacher = change.pop("teacher", tiny_esm1b)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fit(config(small_fasta, tmp_path / "r", teacher, teacher_cache=str(cache), **change))


def test_other_data_is_refused(cache, small_fasta, tiny_esm1b, tmp_path):
    other = tmp_path / "other.fasta"
    other.write_text(small_fasta.read_text().replace("\n>", "\n>x", 1))
    with pytest.raises(CacheMismatch, match="data_sha256"):
        fit(config(other, tmp_path / "r", tiny_esm1b, teacher_cache=str(cache)))
    res = runner.invoke(app, ["teacher-cache", str(other), "-o", str(cache), "--teacher", str(tiny_esm1b), "--views", "2", "--quiet"])
    assert res.exit_code == 2 and "already holds a cache for other settings" in res.output


def test_interrupted_build_is_detected_and_resumed(cache, small_fasta, tiny_esm1b):
    complete = {p.name: p.read_bytes() for p in cache.glob("*.npy")}
    # What a kill mid-build leaves: meta not complete, a shard without its offsets (and a stray temp file).
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    (cache / "v001-s00001.offsets.npy").unlink()
    (cache / "v001-s00001.logits.npy").write_bytes(b"half a file")
    with pytest.raises(ValueError, match="incomplete \\(1 of 6 shards missing\\)"):
        TeacherCache(cache)
    res = runner.invoke(app, ["teacher-cache", str(small_fasta), "-o", str(cache), "--teacher", str(tiny_esm1b), "--views", "2"])
    assert res.exit_code == 0 and "5 of 6 shards already done" in res.output
    assert {p.name: p.read_bytes() for p in cache.glob("*.npy")} == complete
    assert TeacherCache(cache).key.views == 2


def test_logits_come_back_in_row_order(cache):
    c = TeacherCache(cache)
    both = c.logits(0, [3, 40]).numpy()
    assert np.array_equal(both, np.concatenate([c.logits(0, [3]).numpy(), c.logits(0, [40]).numpy()]))
