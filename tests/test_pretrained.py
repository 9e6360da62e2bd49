import argparse
import pickle
import shutil

import esm
import pytest
import torch

from distill.core import tokens
from distill.core.config import ModelConfig
from distill.core.model import ESM
from distill.core.pretrained import ModelNotAvailable, load_fair_esm, load_pretrained, save_fair_esm


def test_published_layout_is_what_fair_esm_expects(tiny_esm1b):
    raw = torch.load(tiny_esm1b, weights_only=False)
    assert isinstance(raw["args"], argparse.Namespace) and raw["args"].arch == "roberta_large"
    assert "encoder.sentence_encoder.layers.0.self_attn.q_proj.weight" in raw["model"]
    assert "encoder.lm_head.dense.weight" in raw["model"]
    assert tiny_esm1b.with_name(tiny_esm1b.stem + "-contact-regression.pt").is_file()


def test_the_weights_only_trap_is_real_and_we_load_safely(tiny_esm1b):
    # fair-esm 2.0.0 on torch >= 2.6, unpatched: refuses the checkpoint (it pickles a Namespace).
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        esm.pretrained.load_model_and_alphabet_local(str(tiny_esm1b))
    # Ours allows exactly argparse.Namespace and keeps the safety on for everything else.
    assert isinstance(load_pretrained(str(tiny_esm1b)), ESM)


def test_arbitrary_pickles_are_still_refused(tmp_path, tiny_esm1b):
    evil = tmp_path / "evil.pt"
    raw = torch.load(tiny_esm1b, weights_only=False)
    raw["payload"] = shutil.rmtree  # any non-allowlisted global
    torch.save(raw, evil)
    shutil.copy(tiny_esm1b.with_name(tiny_esm1b.stem + "-contact-regression.pt"), tmp_path / "evil-contact-regression.pt")
    with pytest.raises(ValueError, match="not a readable fair-esm checkpoint"):
        load_pretrained(str(evil))


def test_hub_name_loads_from_the_torch_hub_cache(tmp_path, monkeypatch, tiny_esm1b):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(tiny_esm1b, cache / "esm1b_t33_650M_UR50S.pt")
    shutil.copy(tiny_esm1b.with_name(tiny_esm1b.stem + "-contact-regression.pt"), cache / "esm1b_t33_650M_UR50S-contact-regression.pt")
    model = load_pretrained("esm1b_t33_650M_UR50S")
    assert model.cfg.layers == 2 and model.cfg.dim == 32


def test_offline_and_not_cached_says_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("network is unreachable")))
    with pytest.raises(ModelNotAvailable) as e:
        load_pretrained("esm1b_t33_650M_UR50S")
    msg = str(e.value)
    assert "esm1b_t33_650M_UR50S.pt" in msg and "esm1b_t33_650M_UR50S-contact-regression.pt" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg and "--teacher /path/to/esm1b_t33_650M_UR50S.pt" in msg
    assert 'teacher = "/path/to/esm1b_t33_650M_UR50S.pt"' in msg  # the same advice for a sweep config


def test_bad_specs(tmp_path, tiny_esm1b):
    with pytest.raises(ValueError, match="neither a fair-esm model name"):
        load_pretrained("not_a_model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "missing.pt"))
    lonely = tmp_path / "lonely.pt"
    shutil.copy(tiny_esm1b, lonely)
    with pytest.raises(FileNotFoundError, match="lonely-contact-regression.pt"):
        load_pretrained(str(lonely))
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(tiny_esm1b.read_bytes()[:1000])
    shutil.copy(tiny_esm1b.with_name(tiny_esm1b.stem + "-contact-regression.pt"), tmp_path / "trunc-contact-regression.pt")
    with pytest.raises(ValueError, match="trunc.pt is not a readable fair-esm checkpoint"):
        load_pretrained(str(truncated))


def test_esm2_checkpoint_loads_with_rotary_positions(tiny_esm2):
    model = load_pretrained(str(tiny_esm2))
    assert model.cfg.position_embedding == "rotary" and model.embed_positions is None


def test_student_round_trips_through_fair_esms_loader(tmp_path, real_sequences):
    torch.manual_seed(0)
    student = ESM(ModelConfig(layers=2, dim=32, heads=4, ffn=64)).eval()
    path, regression = save_fair_esm(student, tmp_path / "student_t2.pt")
    assert regression.name == "student_t2-contact-regression.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        fair, alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
    assert alphabet.all_toks == list(tokens.TOKENS)
    batch = torch.from_numpy(tokens.pad_batch([tokens.encode(s) for s in real_sequences]))
    with torch.no_grad():
        a = fair.eval()(batch)["logits"]
        b = student(batch)["logits"]
    real = batch.ne(tokens.PAD)
    assert (a - b)[real].abs().max() <= 1e-5
    # and back into our module: identical weights
    again = load_pretrained(str(path))
    for (k, v), (k2, v2) in zip(student.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_rotary_students_cannot_masquerade_as_esm1b(tmp_path):
    with pytest.raises(ValueError, match="learned-position"):
        save_fair_esm(ESM(ModelConfig(layers=1, dim=16, heads=2, ffn=32, position_embedding="rotary")), tmp_path / "x.pt")


def test_load_fair_esm_returns_fair_esms_own_class(tiny_esm1b):
    assert type(load_fair_esm(str(tiny_esm1b))).__name__ == "ProteinBertModel"
