"""Input rules shared by every backend: validation and the long-sequence policy.

ESM-1b has 1,024 learned positions, so a sequence holds at most 1,022 residues. Longer ones are refused
(``error``), cut to their leading 1,022 (``crop``), or cut into overlapping windows whose outputs are averaged
(``windows``: 1,022 residues, stride 511, the last window ending at the sequence's end).
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.core import tokens

LONG_POLICIES = ("error", "crop", "windows")
WINDOW = tokens.MAX_RESIDUES
STRIDE = WINDOW // 2  # 50% overlap


class SequenceError(ValueError):
    """A bad input sequence; ``index`` (from 0) says which one. Messages count from 1, like residue positions."""

    def __init__(self, index: int, message: str):
        super().__init__(f"sequence {index + 1}: {message}")
        self.index = index


def check_policy(long: str) -> str:
    if long not in LONG_POLICIES:
        raise ValueError(f"the long-sequence policy must be one of {', '.join(LONG_POLICIES)}, got {long!r}")
    return long


def validate(sequences: list[str], long: str = "error") -> list[str]:
    """Stripped, upper-cased sequences, or ``SequenceError`` naming the index and the problem."""
    check_policy(long)
    out = []
    for i, seq in enumerate(sequences):
        if not isinstance(seq, str) or not seq.strip():
            raise SequenceError(i, "empty sequence")
        seq = tokens.ascii_upper(seq.strip())
        bad = tokens.illegal_position(seq)
        if bad is not None:
            raise SequenceError(i, f"illegal residue {seq[bad]!r} at position {bad + 1}; allowed: {tokens.RESIDUE_LETTERS}")
        if len(seq) > WINDOW and long == "error":
            raise SequenceError(
                i,
                f"{len(seq)} residues exceed the limit of {WINDOW} (ask for crop to embed the first {WINDOW}, or windows to average over all)",
            )
        out.append(seq)
    return out


def windows(length: int) -> list[tuple[int, int]]:
    """Overlapping [start, end) windows of ``WINDOW`` residues covering a sequence; the last one ends at the end."""
    if length <= WINDOW:
        return [(0, length)]
    starts = list(range(0, length - WINDOW, STRIDE)) + [length - WINDOW]
    return [(s, s + WINDOW) for s in starts]


def spans(length: int, long: str) -> list[tuple[int, int]]:
    """The [start, end) pieces a sequence of ``length`` residues is run as, under the policy."""
    if length <= WINDOW:
        return [(0, length)]
    if long == "windows":
        return windows(length)
    if long == "crop":
        return [(0, WINDOW)]
    raise ValueError(f"{length} residues exceed the limit of {WINDOW} and the policy is {long!r}")


def long_note(length: int, long: str) -> str:
    """What the policy did to a sequence, in words ('' when nothing): the message column of `distill annotate`."""
    if length <= WINDOW:
        return ""
    if long == "crop":
        return f"cropped: leading {WINDOW} of {length} residues"
    return f"windows: {len(windows(length))} x {WINDOW} residues (stride {STRIDE}), averaged"


@dataclass
class Pieces:
    """Validated sequences cut into at most 1,022-residue pieces; ``owner[j]`` is the input index of piece j."""

    sequences: list[str]  # validated inputs, whole
    pieces: list[str]
    owner: list[int]
    starts: list[int]  # where each piece starts in its sequence

    @property
    def long(self) -> list[bool]:
        return [len(s) > WINDOW for s in self.sequences]


def prepare(sequences: list[str], long: str = "error") -> Pieces:
    """Validate, then apply the long-sequence policy: the one place sequences are cropped or windowed."""
    seqs = validate(sequences, long)
    pieces, owner, starts = [], [], []
    for i, s in enumerate(seqs):
        for a, b in spans(len(s), long):
            pieces.append(s[a:b])
            owner.append(i)
            starts.append(a)
    return Pieces(seqs, pieces, owner, starts)
