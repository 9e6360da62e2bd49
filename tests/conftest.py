from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The suite runs on pytest-xdist workers (pyproject: -n auto). They share the cores, so each takes its share of
# threads for itself and the processes its tests start: oversubscribed OpenMP threads spin and run many times slower.
# Set before torch is first imported (esm_checkpoints below).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

from esm_checkpoints import write_tiny_esm1b, write_tiny_esm2  # noqa: E402

# Embedding caches of the test session live in a fresh directory: never the user's, never a previous run's.
os.environ["ESM_DISTILL_CACHE"] = tempfile.mkdtemp(prefix="esm-distill-test-cache-")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "examples"


# The longest modules first: xdist hands out whole modules (--dist loadfile) in collection order, so the long ones
# start at once and the many short ones fill the gaps, instead of one long module starting last and running alone.
LONGEST_FIRST = ["test_service.py", "test_export_onnx.py", "test_probe.py", "test_sweep.py", "test_train.py", "test_scale.py",
                 "test_annotate.py", "test_finetune.py"]  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order is kept


@pytest.fixture(scope="session", autouse=True)
def pca_draws_tsne():
    """In-process probes draw their t-SNE panels with PCA: t-SNE's 1,000 optimisation steps per panel cost about a
    second each, a third of a sweep test's time. The figure test puts sklearn's TSNE back (test_probe)."""
    from sklearn.decomposition import PCA

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("distill.recipes.plots.TSNE", lambda n_components, **_: PCA(n_components))
        yield


def dies_with_pytest() -> None:
    """``preexec_fn`` of every long-lived process a test starts: the kernel sends it SIGTERM when pytest dies, even by
    SIGKILL (a CI timeout), so a killed test run leaves no server or worker behind (`distill serve` then stops its
    own). Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_session(cmd: list[str], **kw) -> subprocess.Popen:  # noqa: ANN003
    """A long-lived process of a test: its own session (its group can be killed whole) and gone with pytest."""
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=dies_with_pytest, **kw)


@pytest.fixture
def spawn():
    """Start a command in its own session; whatever the test's outcome, its whole process group is killed afterwards
    (torchrun's ranks and the server's workers included)."""
    started: list[subprocess.Popen] = []

    def start(cmd: list[str], **kw) -> subprocess.Popen:
        started.append(start_session(cmd, **kw))
        return started[-1]

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def shared(path: str) -> Path:
    p = SHARED / path
    if not p.exists():
        pytest.skip(f"staged data {p} not present")
    return p


@pytest.fixture(scope="session")
def tiny_esm1b(tmp_path_factory) -> Path:
    return write_tiny_esm1b(tmp_path_factory.mktemp("esm1b") / "esm1b_t2_tiny.pt")


@pytest.fixture(scope="session")
def tiny_esm2(tmp_path_factory) -> Path:
    return write_tiny_esm2(tmp_path_factory.mktemp("esm2") / "esm2_t2_tiny.pt")


@pytest.fixture(scope="session")
def real_sequences() -> list[str]:
    """Six real proteins at the length quantiles (23-300 aa) from the bundled sample."""
    from distill.core.fasta import read_fasta

    records = sorted((r.sequence for r in read_fasta(EXAMPLES / "train.fasta") if len(r.sequence) <= 300), key=len)
    return [records[round(q * (len(records) - 1))] for q in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]  # length quantiles


def write_fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in records))
    return path


def write_labelled(path: Path, records: list) -> Path:
    """FASTA records (``distill.core.fasta.Record``) with their header descriptions (the labels) kept."""
    path.write_text("".join(f">{r.id} {r.description}\n{r.sequence}\n" for r in records))
    return path


def pfam_examples(families: tuple[str, ...]) -> dict[str, list]:
    """The bundled Pfam sample's records of ``families``, in file order (``distill.core.fasta.Record``)."""
    from distill.core.fasta import read_fasta

    records = list(read_fasta(EXAMPLES / "pfam.fasta"))
    return {f: [r for r in records if r.description == f] for f in families}


def tiny_bundle(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-dim student bundle with random weights: a model for tests that need any model."""
    from distill.core.bundle import save_bundle
    from distill.core.config import ModelConfig
    from distill.core.model import build_student

    return save_bundle(path, build_student(ModelConfig(layers=2, dim=32, heads=2, ffn=64), seed=seed), None)


def write_small_fasta(directory: Path) -> Path:
    """60 real Pfam domains (SH3, WW, zf-C2H2: 20 each) from the bundled sample, for quick training runs."""
    from distill.core.fasta import read_fasta

    families = ("PF00018", "PF00397", "PF00096")
    records = [(r.id, r.sequence) for r in read_fasta(EXAMPLES / "train.fasta") if r.description in families]
    assert len(records) == 60
    return write_fasta(directory / "small.fasta", records)


@pytest.fixture
def small_fasta(tmp_path) -> Path:
    return write_small_fasta(tmp_path)
