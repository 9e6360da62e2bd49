import json

import pytest
import torch

from distill.core import tokens
from distill.core.bundle import BundleError, load_any, load_bundle, save_bundle
from distill.core.config import ModelConfig
from distill.core.model import ESM
from distill.core.spec import SpecError


@pytest.fixture
def bundle(tmp_path):
    torch.manual_seed(0)
    model = ESM(ModelConfig(layers=2, dim=32, heads=4, ffn=64))
    return save_bundle(tmp_path / "student", model, "custom", {"val_ppl": 12.5}), model


def test_round_trip_gives_identical_outputs(bundle):
    path, model = bundle
    loaded, card = load_bundle(path)
    assert card["parameters"] == model.num_parameters() and card["training"]["val_ppl"] == 12.5
    assert card["alphabet"]["tokens"] == list(tokens.TOKENS)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight  # tie survives safetensors
    batch = torch.from_numpy(tokens.pad_batch([tokens.encode("MKTAYIAKQR"), tokens.encode("MV")]))
    with torch.no_grad():
        assert torch.equal(loaded(batch)["logits"], model.eval()(batch)["logits"])


def test_overwrite_is_atomic_and_leaves_no_temporaries(bundle):
    path, model = bundle
    save_bundle(path, model, "custom", {"val_ppl": 11.0})
    assert load_bundle(path)[1]["training"]["val_ppl"] == 11.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["student"]


def test_errors_name_the_problem(bundle, tmp_path):
    path, _ = bundle
    with pytest.raises(BundleError, match="is not a directory"):
        load_bundle(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="config.json is missing"):
        load_bundle(empty)
    (empty / "config.json").write_text("{oops")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(empty)
    (empty / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BundleError, match="not an esm-distill bundle"):
        load_bundle(empty)

    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        load_bundle(path)
    weights.write_bytes(good)

    card = json.loads((path / "config.json").read_text())
    card["model"]["layers"] = 3
    (path / "config.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="does not match the architecture"):
        load_bundle(path)


def test_load_any_takes_bundles_and_fair_esm_checkpoints(bundle, tiny_esm1b):
    assert load_any(str(bundle[0]))[1]["preset"] == "custom"
    model, card = load_any(str(tiny_esm1b))
    assert card["parameters"] == model.num_parameters()
    with pytest.raises(SpecError, match="neither a student bundle"):
        load_any("no/such/thing")
