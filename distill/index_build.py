"""``distill index``: read labelled references, embed them with the model, build or extend the index."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from distill.config import POOLINGS
from distill.distributed import pick_device
from distill.embeddings import embed
from distill.encoders import load_encoder
from distill.heads import heads_of
from distill.index import ReferenceIndex, build_index, load_index
from distill.labels import read_labelled


def default_pooling(spec: str) -> str:
    """A fine-tuned bundle's head pooling (its embedding space is what the head was trained on), else mean."""
    if Path(spec).is_dir():
        heads = heads_of(Path(spec))
        fine = [h for h in heads.values() if h.card.get("protocol", {}).get("kind") == "fine-tuned"]
        if fine:
            return fine[0].pooling
    return "mean"


def index_command(
    model: str, data: list[str], task: str, output: Path, append: bool, labels: Path | None, pooling: str,
    target: float, max_tokens: int, device: str, console: Console, align: int = 0,
) -> ReferenceIndex:  # fmt: skip
    pooling = pooling or default_pooling(model)
    if pooling not in POOLINGS:
        raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    previous = load_index(output) if append else None
    if not append and (Path(output) / "index.json").exists():
        raise FileExistsError(f"{output} holds an index; add to it with --append or choose another -o")
    if previous is not None and previous.card["pooling"] != pooling:
        raise ValueError(f"the index at {output} holds {previous.card['pooling']}-pooled embeddings; --pooling {pooling} would mix spaces")
    ds = read_labelled(data, task, labels)
    encoder = load_encoder(model)
    dev = str(pick_device(device))
    net = encoder.model.eval().to(dev)
    console.print(f"indexing {len(ds)} {task} references with {encoder.name} ({pooling} pooling)")

    def embed_fn(sequences: list[str]):  # noqa: ANN202
        return embed(net, sequences, pooling, max_tokens, dev, encoder.name, quiet=False)

    if previous is not None and align and align != previous.align:
        raise ValueError(
            f"the index at {output} re-ranks {previous.align} candidates; --align {align} would change its calls (leave it out)"
        )
    if align < 0:
        raise ValueError(f"--align must be 0 (cosine calls) or a number of candidates to align, got {align}")
    card = {"model": model, "fingerprint": encoder.fingerprint, "pooling": pooling, "dim": net.cfg.dim, "task": task, "align": align}
    index = build_index(embed_fn, ds.ids, ds.sequences, ds.labels, card, previous, target)
    index.save(output)
    return index
