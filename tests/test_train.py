import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_small_fasta
from safetensors.torch import load_file
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core import data
from distill.core.config import FitConfig, ModelConfig
from distill.core.losses import distillation_loss, residue_logits
from distill.core.model import ESM
from distill.recipes.fit import fit
from distill.recipes.teacher_cache import load_teacher

TINY = {"preset": "custom", "layers": 2, "dim": 32, "heads": 4, "ffn": 64}
runner = CliRunner()


def config(fasta, out, teacher, **kw) -> FitConfig:
    base = dict(
        data=str(fasta), out=str(out), teacher=str(teacher), epochs=2, batch_size=16, max_tokens=600, lr=3e-3, seed=0, quiet=True, **TINY
    )
    return FitConfig(**{**base, **kw})


def rows(run: Path, event: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    pointer = json.loads((run / "checkpoint.json").read_text())
    return load_file(run / pointer["path"] / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_distillation_lowers_the_loss_on_real_sequences(small_fasta, tiny_esm1b, tmp_path):
    run = fit(config(small_fasta, tmp_path / "run", tiny_esm1b, epochs=6, lam=0.5, valid_fraction=0.0)).out
    r = rows(run)
    assert all(x["kd"] > 0 for x in r) and all(0 <= x["padding"] < 0.5 for x in r)
    first, last = sum(x["loss"] for x in r[:3]) / 3, sum(x["loss"] for x in r[-3:]) / 3
    assert last < 0.9 * first
    # the run directory has everything downstream needs
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.json", "checkpoints", "student"}
    card = json.loads((run / "student" / "config.json").read_text())
    assert card["training"]["teacher"] == str(tiny_esm1b) and card["training"]["lam"] == 0.5
    assert card["training"]["data_sha256"] == data.dataset_fingerprint(small_fasta)


def test_teacher_is_frozen_and_gradients_reach_the_student_only(tiny_esm1b, real_sequences):
    teacher, sha = load_teacher(str(tiny_esm1b), torch.device("cpu"))
    assert len(sha) == 64
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = ESM(ModelConfig(layers=2, dim=32, heads=4, ffn=64))
    examples = [data.masked_example(data.tokens.encode(s), 0, 0, i, 0.15, True) for i, s in enumerate(real_sequences)]
    batch = data.collate(examples, list(range(len(examples))))
    sel = batch.labels != data.IGNORE
    with torch.no_grad():
        t = residue_logits(teacher(batch.tokens)["logits"][sel])
    loss = distillation_loss(student(batch.tokens)["logits"][sel], batch.labels[sel], t, 0.5, 2.0, batch.n_targets)
    loss.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_same_seed_same_curve_other_seed_other_curve(small_fasta, tiny_esm1b, tmp_path):
    a = rows(fit(config(small_fasta, tmp_path / "a", tiny_esm1b, epochs=1)).out)
    b = rows(fit(config(small_fasta, tmp_path / "b", tiny_esm1b, epochs=1)).out)
    c = rows(fit(config(small_fasta, tmp_path / "c", tiny_esm1b, epochs=1, seed=1)).out)
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert [x["loss"] for x in a] != [x["loss"] for x in c]


def test_max_tokens_only_changes_micro_batching_not_the_result(small_fasta, tiny_esm1b, tmp_path):
    a = rows(fit(config(small_fasta, tmp_path / "a", tiny_esm1b, epochs=1, max_tokens=2000)).out)
    b = rows(fit(config(small_fasta, tmp_path / "b", tiny_esm1b, epochs=1, max_tokens=120)).out)
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], rel=1e-5)


def test_resumed_run_ends_with_the_same_weights(small_fasta, tiny_esm1b, tmp_path):
    whole = fit(config(small_fasta, tmp_path / "whole", tiny_esm1b)).out
    part = fit(config(small_fasta, tmp_path / "part", tiny_esm1b, max_steps=3))
    assert not part.completed and json.loads((part.out / "checkpoint.json").read_text())["global_step"] == 3
    done = fit(config(small_fasta, tmp_path / "part", tiny_esm1b), resume=True)
    assert done.completed
    assert_same_weights(whole, done.out)
    assert [x["step"] for x in rows(done.out)] == [x["step"] for x in rows(whole)]
    assert [x["loss"] for x in rows(done.out)] == [x["loss"] for x in rows(whole)]


def test_lam_zero_loads_no_teacher(small_fasta, tmp_path):
    res = fit(config(small_fasta, tmp_path / "v", "no/such/teacher.pt", lam=0.0, epochs=1))
    assert res.completed and all(x["kd"] == 0 for x in rows(res.out))
    assert json.loads((res.out / "student" / "config.json").read_text())["training"]["teacher"] is None


def test_refuses_to_overwrite_a_run_and_reports_corrupt_checkpoints(small_fasta, tiny_esm1b, tmp_path):
    run = fit(config(small_fasta, tmp_path / "r", tiny_esm1b, max_steps=1)).out
    with pytest.raises(FileExistsError, match="--resume"):
        fit(config(small_fasta, run, tiny_esm1b))
    ckpt = run / json.loads((run / "checkpoint.json").read_text())["path"] / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or does not match"):
        fit(config(small_fasta, run, tiny_esm1b), resume=True)


def _cli(spawn, *args: str) -> subprocess.Popen:
    return spawn([sys.executable, "-m", "distill", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _cli_args(fasta, out, teacher, epochs=3) -> list[str]:
    return [
        "fit", str(fasta), "--out", str(out), "--teacher", str(teacher), "--preset", "custom", "--layers", "2", "--dim", "32",
        "--attention-heads", "4", "--epochs", str(epochs), "--batch-size", "4", "--max-tokens", "600", "--lr", "3e-3", "--quiet",
    ]  # fmt: skip


def _wait_for_rows(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise TimeoutError


@pytest.fixture(scope="module")
def whole_run(tiny_esm1b, tmp_path_factory) -> Path:
    """The uninterrupted CLI run both kill tests compare against (one run, not one per signal)."""
    root = tmp_path_factory.mktemp("whole")
    fasta = write_small_fasta(root)
    done = subprocess.run([sys.executable, "-m", "distill", *_cli_args(fasta, root / "run", tiny_esm1b)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "run"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_or_interrupted_run_resumes_to_the_same_weights(sig, spawn, whole_run, small_fasta, tiny_esm1b, tmp_path):
    run = tmp_path / "killed"
    proc = _cli(spawn, *_cli_args(small_fasta, run, tiny_esm1b))
    _wait_for_rows(run, 20, proc)  # mid-way through epoch 2
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    if sig == signal.SIGINT:
        assert code == 130, proc.stdout.read()  # Ctrl-C: checkpoint written, clean exit, resumable
        assert "continue with: distill fit --resume" in proc.stdout.read()
    resumed = _cli(spawn, "fit", "--resume", str(run), "--quiet")
    assert resumed.wait() == 0, resumed.stdout.read()
    assert_same_weights(whole_run, run)
    assert [x["step"] for x in rows(run)] == [x["step"] for x in rows(whole_run)]


def test_cli_config_reuse_and_resume_guards(small_fasta, tiny_esm1b, tmp_path):
    first = tmp_path / "first"
    res = runner.invoke(app, _cli_args(small_fasta, first, tiny_esm1b, epochs=1))
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["fit", "--config", str(first / "config.json"), "--out", str(tmp_path / "second"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert [x["loss"] for x in rows(first)] == [x["loss"] for x in rows(tmp_path / "second")]
    res = runner.invoke(app, ["fit", "--resume", str(first), "--lam", "0.9"])
    assert res.exit_code == 2 and "differ from it: lam" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    res = runner.invoke(app, ["fit", "--config", str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not valid JSON" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lam", "1.5"], "--lam must be in [0, 1]"),
        (["--preset", "huge"], "--preset must be one of"),
        (["--max-tokens", "20"], "--max-tokens 20 cannot hold one sequence"),
        (
            ["--teacher", "no_such_model"],
            "is neither a student bundle directory, random:PRESET[@SEED] or random:BUNDLE[@SEED], a fair-esm model name",
        ),
    ],
)
def test_cli_bad_options_are_clear_errors(args, message, small_fasta, tmp_path):
    res = runner.invoke(app, ["fit", str(small_fasta), "--out", str(tmp_path / "r"), "--quiet", *args])
    assert res.exit_code == 2 and message in res.output, res.output


def test_cli_bad_fasta_names_record_and_line(tmp_path):
    bad = tmp_path / "bad.fa"
    bad.write_text(">p1\nMKV\n>p2\nMK1V\n")
    res = runner.invoke(app, ["fit", str(bad), "--out", str(tmp_path / "r"), "--lam", "0"])
    assert res.exit_code == 2 and "record 'p2' line 4 column 3" in res.output


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_ddp_on_two_cpu_processes_matches_one_process(spawn, small_fasta, tiny_esm1b, tmp_path):
    single = tmp_path / "single"
    assert _cli(spawn, *_cli_args(small_fasta, single, tiny_esm1b, epochs=1)).wait() == 0
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m", "distill"]
    proc = spawn(
        cmd + _cli_args(small_fasta, ddp, tiny_esm1b, epochs=1), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert json.loads((ddp / "ddp_check.json").read_text()) == {"world_size": 2, "parameters_equal": True}
    assert [x["loss"] for x in rows(ddp)] == pytest.approx([x["loss"] for x in rows(single)], rel=1e-4)
    a, b = final_weights(single), final_weights(ddp)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
