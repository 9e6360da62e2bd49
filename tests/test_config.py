"""The config dataclasses are the one source of defaults: the docs' tables and the CLI's help must agree with them."""

import re

from conftest import REPO
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core.config import PRESET_TRAINING, PRESETS, FitConfig, ModelConfig

README = (REPO / "README.md").read_text()
TRAINING = (REPO / "docs" / "training.md").read_text()
D = FitConfig(data="", out="")


def table(heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table after ``heading``."""
    text = TRAINING.split(heading, 1)[1]
    rows = [line for line in text.split("\n\n", 2)[1].splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[2:]]


def test_fit_options_table_matches_fit_config():
    checked = 0
    for option, default, _ in table("## `distill fit` options"):
        name = option.strip("`").split()[0].removeprefix("--").replace("-", "_")
        if not hasattr(D, name) or default in ("", "preset", "hash split", "5% of steps", "off"):
            continue
        if name in ("epochs", "batch_size"):
            per_preset = [e if name == "epochs" else b for b, e in PRESET_TRAINING.values()]
            assert [int(x) for x in default.split(" / ")] == per_preset, option
        else:
            value = getattr(D, name)
            assert (float(default) == value) if isinstance(value, int | float) else default == str(value), (
                f"{option}: README {default}, FitConfig {value}"
            )
        checked += 1
    assert checked >= 14  # the table still has its rows


def test_preset_table_matches_presets_and_study_schedules():
    text = TRAINING.split("| preset | layers | dim | heads | FFN | parameters | batch / epochs (study) |", 1)[1]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()[2:5]]
    assert [r[0].strip("`") for r in rows] == list(PRESETS)
    for name, layers, dim, heads, ffn, _, schedule in rows:
        cfg = ModelConfig.preset(name.strip("`"))
        assert (cfg.layers, cfg.dim, cfg.heads, cfg.ffn) == (int(layers), int(dim), int(heads), int(ffn))
        assert tuple(int(x) for x in schedule.split(" / ")) == PRESET_TRAINING[name.strip("`")]


def test_readme_preset_table_matches_presets():
    text = README.split("| preset | layers | dim | heads | FFN | parameters |", 1)[1]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()[2:5]]
    assert [r[0].strip("`") for r in rows] == list(PRESETS)
    for name, layers, dim, heads, ffn, _ in rows:
        cfg = ModelConfig.preset(name.strip("`"))
        assert (cfg.layers, cfg.dim, cfg.heads, cfg.ffn) == (int(layers), int(dim), int(heads), int(ffn))


def test_cli_help_shows_the_config_defaults():
    res = CliRunner().invoke(app, ["fit", "--help"], env={"COLUMNS": "240", "TERM": "dumb"})
    assert res.exit_code == 0
    flat = " ".join(res.output.split())
    for name in ("temperature", "lam", "lr", "mask_rate", "max_tokens", "valid_fraction"):
        assert f"[default: {getattr(D, name)}]" in flat, name
