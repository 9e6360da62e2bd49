"""The model card (README.md) of a student exported for Hugging Face: what it is, how it was made, how to use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.core.model import ESM


def _training_lines(card: dict[str, Any]) -> list[str]:
    t = card.get("training") or {}
    if not t:
        return ["- Training: not recorded (a random-init or converted model)."]
    if "finetune" in t:
        f = t["finetune"]
        return [f"- Fine-tuned on task `{f.get('task')}` from `{f.get('parent')}` (best epoch {f.get('best_epoch')})."]
    lines = [
        f"- Distilled from `{t.get('teacher') or 'no teacher (vanilla masked LM)'}` with lambda = {t.get('lam')}, temperature T = {t.get('temperature')}:",
        "  `L = (1 - lambda) L_MLM + lambda T^2 KL(teacher/T || student/T)` over masked positions.",
        f"- Data: `{t.get('data')}` (sha256 {str(t.get('data_sha256', ''))[:16]}...), {t.get('n_train')} training / {t.get('n_valid')} validation sequences,",
        f"  {t.get('epochs_done', t.get('epochs'))} epochs, batch {t.get('batch_size')}, seed {t.get('seed')}.",
    ]
    if t.get("val_ppl") is not None:
        lines.append(f"- Validation masked-LM perplexity: {t['val_ppl']:.3f} (fixed-seed masking).")
    return lines


def _head_lines(out: Path) -> list[str]:
    heads = sorted((out / "heads").glob("*/labels.json")) if (out / "heads").is_dir() else []
    if not heads:
        return ["No classification heads were exported with this model."]
    lines = ["Classification heads are stored as `heads/<task>/head.safetensors` + `labels.json` (not merged into the model:",
             "each reads a pooled embedding, and the pooling is part of the head):", ""]  # fmt: skip
    for path in heads:
        c = json.loads(path.read_text())
        m = c.get("metrics", {})
        metrics = f"accuracy {m['accuracy']:.3f}, macro-F1 {m['f1_macro']:.3f}" if "accuracy" in m else "no test metrics recorded"
        lines.append(f"- `{path.parent.name}`: {len(c['labels'])} labels, `{c.get('pooling', 'mean')}` pooling, {metrics}.")
    lines += ["", "Apply one with esm-distill (`pip install esm-distill`), which standardises, applies the (cosine or linear) layer and",
              "the calibrated temperature exactly as in training:", "", "```python",
              "from distill.core.heads import load_head", "head = load_head('heads/pfam')", "probabilities = head.probabilities(embeddings)  # [n, dim] pooled as the head's card says",
              "```"]  # fmt: skip
    return lines


def model_card(model: ESM, card: dict[str, Any], out: Path) -> str:
    c = model.cfg
    arch = (f"{c.layers} layers x {c.dim} dim, {c.heads} heads, FFN {c.ffn}, {model.num_parameters() / 1e6:.2f}M parameters, "
            f"{'learned absolute (ESM-1b)' if c.position_embedding == 'learned' else 'rotary (ESM-2)'} positions")  # fmt: skip
    lines = [
        "---", "library_name: transformers", "tags: [protein, esm, esm-distill, masked-lm]", "---", "",
        f"# {out.name}", "",
        f"A compact ESM-architecture protein language model made with esm-distill: {arch}. It loads as `EsmForMaskedLM`",
        "with the standard ESM tokenizer (the 33-token ESM-1b alphabet).", "",
        "## How it was made", "", *_training_lines(card), "",
        "## Use", "", "```python", "from transformers import AutoModelForMaskedLM, AutoTokenizer", "",
        f"tokenizer = AutoTokenizer.from_pretrained('{out.name}')", f"model = AutoModelForMaskedLM.from_pretrained('{out.name}')",
        "batch = tokenizer(['MKTAYIAKQRQISFVKSHFSRQ'], return_tensors='pt')",
        "hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # [1, length + 2, dim]",
        "embedding = hidden[0, 1:-1].mean(0)  # mean over residues: the sequence embedding esm-distill uses", "```", "",
        "## Heads", "", *_head_lines(out), "",
        "## Limitations", "",
        "- At most 1,022 residues per sequence (ESM-1b's 1,024 positions); longer ones must be cropped or windowed.",
        "- The contact-prediction head of `EsmForMaskedLM` is all zeros: contacts were not trained.",
        "- A small student is much weaker than ESM-1b on remote homology; check it on your task before relying on it.",
        "- Metrics above are from the data named above, not from an independent benchmark.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"
