"""One model-spec grammar, classified in one place (distill.core.spec)."""

import json
import subprocess
import sys

import esm
import pytest

from distill.core.config import ModelConfig
from distill.core.spec import FAIR_ESM_NAME, GRAMMAR, SpecError, parse_spec


@pytest.fixture
def dirs(tmp_path):
    bundle = tmp_path / "run1" / "student"
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"format": "esm-distill-bundle", "model": ModelConfig.preset("small").to_dict()}))
    hf = tmp_path / "hf-esm"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "esm"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    return bundle, hf, empty


def test_every_kind_is_classified_with_its_name(dirs, tmp_path):
    bundle, hf, _ = dirs
    cases = {
        str(bundle): ("bundle", "run1"),  # a bundle called `student` is named by its run
        str(hf): ("hf-dir", "hf-esm"),
        "random:small": ("random", "random:small"),
        "esm1b_t33_650M_UR50S": ("fair-esm", "esm1b_t33_650M_UR50S"),
        str(tmp_path / "ckpt.pt"): ("fair-esm", "ckpt"),
        "facebook/esm2_t6_8M_UR50D": ("hf-hub", "facebook/esm2_t6_8M_UR50D"),
        str(tmp_path / "model.int8.onnx"): ("onnx", "model.int8"),
        "http://127.0.0.1:3000": ("http", "http://127.0.0.1:3000"),
        "composition": ("composition", "composition"),
    }
    for text, (kind, name) in cases.items():
        spec = parse_spec(text)
        assert (spec.kind, spec.name) == (kind, name), text


def test_random_specs_carry_preset_seed_and_shape(dirs):
    bundle = dirs[0]
    s = parse_spec("random:medium@7")
    assert (s.preset, s.seed, s.config) == ("medium", 7, ModelConfig.preset("medium"))
    s = parse_spec(f"random:{bundle}@2")
    assert (s.preset, s.seed, s.config, s.path) == ("small", 2, ModelConfig.preset("small"), bundle)
    with pytest.raises(SpecError, match="the seed after @ must be a non-negative integer"):
        parse_spec("random:small@x")
    with pytest.raises(SpecError, match="after random: give a preset"):
        parse_spec("random:huge")


def test_a_string_that_names_nothing_gets_the_whole_grammar(dirs):
    with pytest.raises(SpecError) as e:
        parse_spec("no/such/thing")
    assert "is neither a student bundle directory" in str(e.value) and "nor http(s)://HOST:PORT" in str(e.value)
    assert isinstance(e.value, ValueError)  # the CLI's error policy: one line, exit 2
    with pytest.raises(SpecError, match="config.json is missing"):
        parse_spec(str(dirs[2]))
    assert "random:PRESET[@SEED]" in GRAMMAR and ".onnx" in GRAMMAR


def test_fair_esm_names_are_recognised_without_importing_fair_esm():
    """The name pattern agrees with fair-esm's own list of models, and parsing a spec never imports torch."""
    models = [n for n in dir(esm.pretrained) if FAIR_ESM_NAME.match(n)]
    assert {"esm1b_t33_650M_UR50S", "esm2_t6_8M_UR50D", "esm1v_t33_650M_UR90S_1", "esm_msa1b_t12_100M_UR50S"} <= set(models)
    assert all(callable(getattr(esm.pretrained, n)) for n in models)
    helpers = [n for n in dir(esm.pretrained) if n.startswith("load") or n.startswith("_")]
    assert not [n for n in helpers if FAIR_ESM_NAME.match(n)]
    code = "import sys; from distill.core.spec import parse_spec; parse_spec('esm1b_t33_650M_UR50S'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
