"""Past one machine: the same outputs on a real local Ray instance and as scheduler shards + `distill merge`."""

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, write_fasta
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core.bundle import save_bundle
from distill.core.config import ModelConfig
from distill.core.fasta import read_fasta
from distill.core.model import ESM
from distill.inference import resolve
from distill.recipes import index_build
from distill.recipes.annotate import Options, annotate
from distill.recipes.scale import RayOptions
from distill.recipes.teacher_cache import TeacherCache

ray = pytest.importorskip("ray")
runner = CliRunner()
REAL = [(r.id, r.sequence) for r in read_fasta(EXAMPLES / "valid.fasta")]


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance (2 CPUs) for the module; the commands use it instead of starting their own. At the end
    its worker processes (children of its raylet) are killed too: they would notice the raylet's exit only later."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
        workers = [pid for pid in _pids() if _parent(pid) == raylet]
        ray.shutdown()
        for pid in workers:  # Ray starts each worker in its own process group: the group, and the process itself
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _parent(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_bundle(tmp_path_factory.mktemp("scale") / "student", ESM(ModelConfig(2, 32, 4, 64)), "custom")


def invoke(*args: str) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def same_arrays(a: Path, b: Path, pattern: str) -> int:
    names = sorted(p.name for p in a.glob(pattern))
    assert names == sorted(p.name for p in b.glob(pattern)) and names
    for name in names:
        np.testing.assert_array_equal(np.load(a / name), np.load(b / name))
    return len(names)


def test_unreachable_ray_address_fails_fast_with_a_clear_message(student, tmp_path):
    fasta = write_fasta(tmp_path / "in.fa", REAL[:3])
    res = runner.invoke(app, ["annotate", str(fasta), "--model", str(student), "-o", str(tmp_path / "o.tsv"), "--ray", "127.0.0.1:9"])
    # the message comes from the pre-check (one connect, 5 s timeout), not from Ray's minute of retries
    assert res.exit_code == 2 and "--ray 127.0.0.1:9: no Ray head answers there" in res.output
    assert not (tmp_path / "o.tsv").exists() and not ray.is_initialized()
    res = runner.invoke(app, ["annotate", str(fasta), "--model", str(student), "-o", str(tmp_path / "o.tsv"), "--ray", "nohost"])
    assert res.exit_code == 2 and "--ray takes HOST:PORT" in res.output


def test_annotate_on_ray_writes_the_same_bytes_with_error_rows_in_input_order(ray_local, student, tmp_path):
    fasta = write_fasta(tmp_path / "in.fa", REAL[:20] + [("bad", "MKVJJ"), ("empty", "")] + REAL[20:45])
    fasta.write_text("ACDE\n" + fasta.read_text() + ">\nMKV\n")  # residues before any header; a header without an id
    common = ["annotate", fasta, "--model", student, "--chunk-records", "4", "--quiet"]
    invoke(*common, "-o", tmp_path / "one.tsv", "--embeddings", tmp_path / "one.npy")
    invoke(*common, "-o", tmp_path / "ray.tsv", "--embeddings", tmp_path / "ray.npy", "--ray", "local", "--workers", "2")
    assert (tmp_path / "ray.tsv").read_bytes() == (tmp_path / "one.tsv").read_bytes()
    rows = [line.split("\t") for line in (tmp_path / "ray.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows[21:23]] == ["bad", "empty"] and rows[0][0].startswith("<no header") and rows[-1][0].startswith("<no id")
    assert [r[-2] for r in rows].count("error") == 4
    np.testing.assert_array_equal(np.load(tmp_path / "ray.npy"), np.load(tmp_path / "one.npy"))


def test_a_killed_actor_is_restarted_and_costs_only_its_chunk(ray_local, student, tmp_path):
    fasta = write_fasta(tmp_path / "in.fa", [(f"r{i}", REAL[i % len(REAL)][1]) for i in range(480)])
    opts = dict(chunk_records=2, quiet=True)
    model = resolve(student)
    annotate(fasta, model, tmp_path / "one.tsv", Options(**opts))
    out, progress = tmp_path / "ray.tsv", tmp_path / "ray.tsv.progress.json"
    run = threading.Thread(
        target=annotate, args=(fasta, model, out, Options(**opts), None, RayOptions(workers=2), resolve_student(student))
    )
    run.start()
    killed = None
    try:
        while run.is_alive() and killed is None:
            state = json.loads(progress.read_text()) if progress.is_file() else {"records": 0, "complete": False}
            workers = actor_pids("ray::ChunkWorker")
            if state["records"] >= 4 and workers:
                assert not state["complete"], "the run ended before a worker could be killed"
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
            time.sleep(0.01)
    finally:
        run.join()
    assert killed is not None, "no worker was killed mid-run"
    assert out.read_bytes() == (tmp_path / "one.tsv").read_bytes()
    assert json.loads(progress.read_text())["records"] == 480


def resolve_student(student: Path):
    from functools import partial

    return partial(resolve, str(student))


def actor_pids(title: str) -> list[int]:
    """Processes whose command line (Ray's process title) starts with ``title``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(title.encode()):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_teacher_cache_on_ray_and_in_shards_equals_one_build(ray_local, small_fasta, tiny_esm1b, tmp_path):
    common = ["teacher-cache", small_fasta, "--teacher", tiny_esm1b, "--views", "2", "--shard-size", "25", "--quiet"]
    invoke(*common, "-o", tmp_path / "one")
    invoke(*common, "-o", tmp_path / "ray", "--ray", "local", "--workers", "2")
    assert same_arrays(tmp_path / "one", tmp_path / "ray", "*.npy") == 12
    for i in (0, 1):
        invoke(*common, "-o", tmp_path / f"p{i}", "--shard", f"{i}/2")
    with pytest.raises(ValueError, match="is part 0/2 of a teacher cache; join all 2 parts with `distill merge"):
        TeacherCache(tmp_path / "p0")
    invoke("merge", tmp_path / "p1", tmp_path / "p0", "-o", tmp_path / "merged")
    assert same_arrays(tmp_path / "one", tmp_path / "merged", "*.npy") == 12
    assert json.loads((tmp_path / "merged" / "meta.json").read_text())["complete"]
    invoke(*common, "-o", tmp_path / "other", "--shard", "1/2", "--seed", "7")
    refusals = {
        "missing": (["p0"], "part(s) 1/2 missing"),
        "duplicated": (["p0", "p1", "p1"], "part 1/2 is given twice"),
        "foreign": (["p0", "other"], "is a part of another cache"),
        "whole": (["p0", "one"], "is a whole cache, not a part"),
    }
    for name, (parts, message) in refusals.items():
        res = runner.invoke(app, ["merge", *(str(tmp_path / p) for p in parts), "-o", str(tmp_path / name)])
        assert res.exit_code == 2 and message in res.output, (name, res.output)
        assert not (tmp_path / name).exists()


def test_index_on_ray_and_in_shards_equals_one_build(ray_local, student, tmp_path, monkeypatch):
    monkeypatch.setattr(index_build, "CHUNK", 128)  # several chunks from the 810 bundled references
    common = ["index", student, "--data", EXAMPLES / "pfam.fasta", "--task", "pfam"]
    invoke(*common, "-o", tmp_path / "one")
    invoke(*common, "-o", tmp_path / "ray", "--ray", "local", "--workers", "2")
    for name in ("index.json", "vectors.npy", "entries.tsv"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    for i in range(3):
        assert "part" in invoke(*common, "-o", tmp_path / f"p{i}", "--shard", f"{i}/3")
    assert [len(np.load(tmp_path / f"p{i}" / "vectors.npy")) for i in range(3)] == [256, 256, 298]
    res = runner.invoke(app, ["merge", str(tmp_path / "p0"), str(tmp_path / "p2"), "-o", str(tmp_path / "m")])
    assert res.exit_code == 2 and "part(s) 1/3 missing" in res.output
    invoke("merge", tmp_path / "p2", tmp_path / "p0", tmp_path / "p1", "-o", tmp_path / "merged")
    for name in ("index.json", "vectors.npy", "entries.tsv"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    (tmp_path / "calls.tsv").write_text("id\n")
    for extra, message in ((["p0", "calls.tsv"], "the parts mix job kinds (annotate, index)"),
                           (["p0", "p1", "p2", "--embeddings", "e.npy"], "--embeddings is for annotate parts, not index parts"),
                           (["p0", "."], "is a directory but not a part of a sharded job")):  # fmt: skip
        args = [str(tmp_path / x) if not x.startswith("-") and x != "e.npy" else x for x in extra]
        res = runner.invoke(app, ["merge", *args, "-o", str(tmp_path / "m2")])
        assert res.exit_code == 2 and message in res.output, res.output
