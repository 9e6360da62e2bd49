"""What `distill annotate` writes per record (the TSV) and per domain (the domain table beside it).

The TSV has one row per FASTA record: each head's top-k labels, then the reference index's call and neighbours.
With an aligning index, ``OUT.domains.tsv`` has one row per region of a protein where references hit (as hmmscan's
domain table): its coordinates on the query, the region's label, ``call`` when the vote clears the label's threshold
or ``related`` when it clears only the index's global one (a homologue below the family's member threshold, e.g. a
relative of another family of the same fold), its evidence and the strongest reference hit with its span. A head
that scans whole proteins (distill.inference.scan) adds its own domain rows (``source``: the task; score: the best
window's probability; no E-value or reference), and its TSV columns read each label's best window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.inference.scan import segment

DOMAIN_COLUMNS = ("id", "domain", "start", "end", "label", "verdict", "score", "evalue", "ref_id", "ref_start", "ref_end", "source")
REFERENCE = "reference"  # the source column of the reference index's rows (a head's rows name its task)


def domains_path(output: Path) -> Path:
    """calls.tsv -> calls.domains.tsv (any other name: NAME.domains.tsv)."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".tsv") + ".domains.tsv")


def clean(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ")


NO_CALL = "-"  # the label written when the top probability (or similarity) is below the calibrated threshold


@dataclass
class Columns:
    """What a TSV row holds: per task top-k labels (``-`` below the threshold), then reference neighbours."""

    tasks: list[str]
    labels: dict[str, list[str]]
    top_k: int
    thresholds: dict[str, float]  # per task: calls need a probability >= this
    reference: Any = None  # a distill.inference.index.ReferenceIndex
    reference_k: int = 0
    label_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)  # per task, labels raised by a background
    scanning: tuple[str, ...] = ()  # tasks whose heads scan whole proteins (their rows carry ``scans``)

    @property
    def aligning(self) -> bool:
        return self.reference is not None and bool(self.reference.align)

    @property
    def domains(self) -> bool:
        """An aligning index or a scanning head places its hits: a domain table is written beside the TSV."""
        return self.aligning or bool(self.scanning)

    def threshold_for(self, task: str, label: str) -> float:
        return self.label_thresholds.get(task, {}).get(label, self.thresholds.get(task, 0.0))

    def header(self) -> str:
        cols = ["id", "length"]
        for t in self.tasks:
            for k in range(1, self.top_k + 1):
                cols += [f"{t}_label_{k}", f"{t}_prob_{k}"]
        if self.reference is not None:
            cols += ["ref_call", "ref_call_score"] + (["ref_call_evalue", "ref_related_to"] if self.aligning else [])
            for k in range(1, self.reference_k + 1):
                cols += [f"ref_id_{k}", f"ref_label_{k}", f"ref_similarity_{k}"]
                cols += [f"ref_score_{k}", f"ref_evalue_{k}"] if self.reference.align else []
        return "\t".join(cols + ["status", "message"]) + "\n"

    def row(self, row: Any, neighbours: tuple | None) -> str:  # Row of distill.recipes.annotate
        cells = [clean(row.id), str(row.length)]
        for t in self.tasks:
            if row.probabilities is None:
                cells += [""] * (2 * self.top_k)
                continue
            p = row.probabilities[t]
            for i in np.argsort(-p, kind="stable")[: self.top_k]:
                label = self.labels[t][i]
                cells += [label if p[i] >= self.threshold_for(t, label) else NO_CALL, f"{p[i]:.4f}"]
        if self.reference is not None:
            per = 3 + 2 * self.aligning
            if neighbours is None:
                cells += [""] * (2 + 2 * self.aligning + per * self.reference_k)
            else:
                ids, labels, sims, scores, evidence, call, call_score = neighbours
                verdict = self.reference.verdict(call, call_score)
                cells += [call if verdict == "call" else NO_CALL, f"{call_score:.4f}"]
                cells += [f"{np.exp(-call_score):.2g}", call if verdict == "related" else ""] if self.aligning else []
                for j, (rid, label, sim) in enumerate(zip(ids, labels, sims, strict=True)):
                    cells += [clean(rid), label, f"{sim:.4f}"]
                    cells += [f"{scores[j]:.0f}", f"{np.exp(-evidence[j]):.2g}"] if scores is not None else []
        return "\t".join(cells + [row.status, clean(row.message)]) + "\n"

    def domain_header(self) -> str:
        return "\t".join(DOMAIN_COLUMNS) + "\n"

    def domain_rows(self, row: Any, regions: list) -> str:
        """The index's regions whose vote clears the global threshold (weaker ones are not significant hits), then
        each scanning head's domains (runs of windows at or above the label's threshold), numbered in that order."""
        cells = []
        for d, verdict in self.reference.reported(regions) if self.aligning else []:
            cells.append([str(d.start), str(d.end), d.label, verdict, f"{d.score:.4f}", f"{d.evalue:.2g}",
                          clean(self.reference.ids[d.ref]), str(d.ref_start), str(d.ref_end), REFERENCE])  # fmt: skip
        for t in self.scanning:
            for d in segment(row.scans[t], self.labels[t], lambda label, t=t: self.threshold_for(t, label)):
                cells.append([str(d.start), str(d.end), d.label, "call", f"{d.score:.4f}", "", "", "", "", t])
        return "".join("\t".join([clean(row.id), str(n), *c]) + "\n" for n, c in enumerate(cells, 1))

    def rows(self, rows: list) -> tuple[str, str]:
        """The TSV rows of one chunk, and its domain rows (empty without an aligning index or a scanning head)."""
        found: dict[int, tuple] = {}
        regions: dict[int, list] = {}
        ok = [i for i, r in enumerate(rows) if r.embedding is not None]
        if self.reference is not None and ok:
            nn = self.reference.search(
                np.stack([rows[i].embedding for i in ok]), self.reference_k, [rows[i].sequence for i in ok], domains=self.aligning
            )
            regions = {i: nn.domains[j] for j, i in enumerate(ok)} if nn.domains is not None else {}
            scores = nn.scores if nn.scores is not None else [None] * len(ok)
            evidence = nn.evidence if nn.evidence is not None else [None] * len(ok)
            found = {
                i: (nn.ids[j], nn.labels[j], nn.similarities[j], scores[j], evidence[j], nn.calls[j], nn.call_scores[j])
                for j, i in enumerate(ok)
            }
        text = "".join(self.row(r, found.get(i)) for i, r in enumerate(rows))
        return text, "".join(self.domain_rows(rows[i], regions.get(i, [])) for i in ok) if self.domains else ""
