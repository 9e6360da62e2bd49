import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import esm
import pytest
import torch
from conftest import EXAMPLES, REPO
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core.bundle import load_bundle, save_bundle
from distill.core.config import ModelConfig
from distill.core.model import ESM

runner = CliRunner()


def quickstart_command() -> list[str]:
    """The `distill fit ...` line of the README's first command, as a newcomer copies it."""
    readme = (REPO / "README.md").read_text()
    line = re.search(r"distill fit examples/train\.fasta[^\n`]*", readme).group(0)
    return line.split()[1:]


def test_readme_quickstart_runs_on_the_bundled_default(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    args = quickstart_command()
    args[args.index("--out") + 1] = str(tmp_path / "quickstart")
    res = runner.invoke(app, [*args, "--max-steps", "2", "--quiet"])
    assert res.exit_code == 130, res.output  # stopped by --max-steps: resumable, not finished
    assert json.loads((tmp_path / "quickstart" / "checkpoint.json").read_text())["global_step"] == 2


def test_bundled_teacher_is_a_fair_esm_checkpoint():
    path = EXAMPLES / "teacher" / "tiny_esm1b_t4_192.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
    assert model.model_version == "ESM-1b" and model.num_layers == 4 and model.args.embed_dim == 192


def test_perplexity_for_bundles_and_fair_esm_checkpoints_agree_on_the_same_weights(tmp_path, tiny_esm1b):
    fasta = EXAMPLES / "valid.fasta"
    res = runner.invoke(app, ["perplexity", str(tiny_esm1b), str(fasta)])
    assert res.exit_code == 0, res.output
    as_pt = json.loads(res.stdout)
    # The same weights as a bundle give the same number (same fixed evaluation masking).
    from distill.core.pretrained import load_pretrained

    save_bundle(tmp_path / "b", load_pretrained(str(tiny_esm1b)), None)
    res = runner.invoke(app, ["perplexity", str(tmp_path / "b"), str(fasta)])
    as_bundle = json.loads(res.stdout)
    assert as_pt["perplexity"] == as_bundle["perplexity"] > 1
    assert as_pt["sequences"] == 216 and as_pt["masked_positions"] > 2000


def test_export_esm_writes_a_loadable_pair(tmp_path):
    torch.manual_seed(0)
    save_bundle(tmp_path / "b", ESM(ModelConfig(layers=1, dim=16, heads=2, ffn=32)), "custom")
    res = runner.invoke(app, ["export", "esm", str(tmp_path / "b"), "-o", str(tmp_path / "s.pt")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s-contact-regression.pt").is_file()
    res = runner.invoke(app, ["export", "esm", str(tmp_path / "missing"), "-o", str(tmp_path / "t.pt")])
    assert res.exit_code == 2 and "is not a directory" in res.output
    assert load_bundle(tmp_path / "b")[0].cfg.dim == 16


def test_error_policy_user_errors_one_line_bugs_traceback_debug_shows_all(tmp_path, monkeypatch):
    import distill.recipes.perplexity

    missing = tmp_path / "missing.fa"
    res = runner.invoke(app, ["perplexity", "random:small", str(missing)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "error:" in res.output and "missing.fa" in res.output, res.output
    assert "Traceback" not in res.output

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch inside torch")

    monkeypatch.setattr(distill.recipes.perplexity, "perplexity_of", broken)
    res = runner.invoke(app, ["perplexity", "random:small", str(missing)])
    assert res.exit_code == 1 and "Traceback" in res.output and "shape mismatch inside torch" in res.output
    assert "it is a bug" in res.output and "memory" not in res.output  # a bug is not sent off to tune --max-tokens

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(distill.recipes.perplexity, "perplexity_of", out_of_memory)
    res = runner.invoke(app, ["perplexity", "random:small", str(missing)])
    assert res.exit_code == 1 and "out of memory (traceback above): lower --max-tokens" in res.output
    assert "it is a bug" not in res.output
    monkeypatch.undo()
    res = runner.invoke(app, ["--debug", "perplexity", "random:small", str(missing)])
    assert isinstance(res.exception, FileNotFoundError)  # --debug: the user error is raised with its traceback


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["annotate", "{fasta}"], "Missing option '-o' / '--output'"),
        (["annotate"], "Missing argument"),
        (["annotate", "{fasta}", "--ray", "-o", "calls.tsv"], "Invalid value for '--ray': needs a value, got the option '-o'"),
        (["export", "onnx", "bundle", "--bogus"], "No such option: --bogus"),
        (["annotate", "{fasta}", "-o", "calls.tsv", "--max-tokens", "many"], "Invalid value for '--max-tokens'"),
        (["fti"], "No such command 'fti'"),
    ],
)
def test_usage_errors_through_the_installed_entry_point_print_usage_and_exit_2(tmp_path, args, expected):
    """The real `distill` script in a subprocess, as a user runs it: whatever click typer vendors, a usage mistake
    is click's usage message and exit 2, never a traceback or the crash advice."""
    fasta = tmp_path / "x.fa"
    fasta.write_text(">a\nMKTAYIAK\n")
    exe = Path(sys.executable).with_name("distill")
    res = subprocess.run([str(exe), *(a.format(fasta=fasta) for a in args)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    assert expected in res.stderr and "Usage: distill" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout and "unexpected error" not in res.stderr


def test_a_bad_option_value_the_command_checks_is_one_error_line_exit_2(tmp_path):
    """Values click cannot judge (a device name) are checked by the command: one `error:` line, same exit code."""
    exe = Path(sys.executable).with_name("distill")
    res = subprocess.run(
        [str(exe), "perplexity", "random:small", "x.fa", "--device", "tpu"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert res.returncode == 2 and res.stderr.strip() == "error: --device must be auto, cpu or cuda, got 'tpu'", res.stderr


def test_readme_test_command_is_what_ci_runs_and_both_install_the_locked_set():
    """A fresh machine gets the dependency set the suite passed with: both README commands and .ci/run install with
    constraints.txt, and that file pins every package to one version."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.M)
    assert len(commands) == 2 and all("-c constraints.txt" in c for c in commands), commands
    assert commands[1] in (REPO / ".ci" / "run").read_text()
    pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^=\s]+", line) for line in pins), [p for p in pins if "==" not in p]
    assert any(line.startswith("typer==") for line in pins) and not any(line.lower().startswith("torch==") for line in pins)


def test_an_option_group_is_declared_once_parsed_once_and_stands_where_the_command_puts_it():
    import typer

    from distill.cli.options import Commands, ScaleOut, grouped, scale_out

    got = []
    demo = typer.Typer(cls=Commands)

    @demo.command()
    @grouped("scale", scale_out)
    def job(path: str, scale: ScaleOut, quiet: bool = False) -> None:
        got.append((path, scale, quiet))

    @demo.command()
    def other() -> None: ...

    res = runner.invoke(demo, ["job", "in.fa", "--shard", "1/4", "--threads", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    assert got == [("in.fa", ScaleOut(ray=None, shard=(1, 4), threads=3), True)]
    res = runner.invoke(demo, ["job", "in.fa", "--ray", "local", "--workers", "2"])
    assert got[-1][1].ray.workers == 2 and got[-1][1].ray.address is None  # 'local' starts Ray here
    help_text = runner.invoke(demo, ["job", "--help"]).output
    options = re.findall(r"^(?:│ |  )(--[a-z-]+)", help_text, re.M)  # an option starts a row; wrapped help does not
    assert options[:6] == ["--shard", "--ray", "--workers", "--threads", "--gpus-per-worker", "--quiet"]
    res = runner.invoke(demo, ["job", "in.fa", "--shard", "4"])  # the group's own check, as a user error
    assert res.exit_code == 2 and "--shard takes I/N" in res.output
    with pytest.raises(AssertionError, match="its own too"):
        grouped("scale", scale_out)(lambda threads, scale: None)
