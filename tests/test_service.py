"""The BentoML service for real: `distill serve` in a subprocess, called over HTTP on a loopback port."""

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, REPO, start_session
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core.bundle import save_bundle
from distill.core.config import ModelConfig
from distill.core.fasta import read_fasta
from distill.core.model import ESM

runner = CliRunner()
TEACHER = EXAMPLES / "teacher" / "tiny_esm1b_t4_192.pt"
SEQS = [r.sequence for r in read_fasta(EXAMPLES / "valid.fasta")][:40]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path | None = None) -> None:
    """Poll BentoML's /readyz (up to 2 minutes); fail with the server log if it never answers."""
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{url}/readyz", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, 9)
    pytest.fail("server did not become ready" + (":\n" + log.read_text()[-3000:] if log else ""))


def post(url: str, payload, raw: bytes | None = None, key: str = "") -> tuple[int, object]:
    data = raw if raw is not None else json.dumps(payload).encode()
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **auth})
    for _ in range(200):  # a busy server (its concurrency cap: 503 + Retry-After) is asked again, as clients should
        try:
            with urllib.request.urlopen(req, timeout=300) as r:  # above the service's stalled-engine retry (60 s)
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode()
            if e.code != 503 or "busy" not in text:
                return e.code, text
            time.sleep(0.05)
    return 503, "still busy after 200 tries"


SCAN = (24, 8)  # the species head's windows (tiny, so that the test sequences have several)
CLIENT_TIMEOUT = 4  # seconds (--client-timeout); below uvicorn's 5-s keep-alive, so the idle case is ours to close


def first_per_label(path: Path, task: str, out: Path, n: int = 8) -> Path:
    """The first ``n`` records of each label of ``task`` (the product's label rule): heads for the (slower) teacher,
    whose tests compare its answers with its own in-process ones, not their quality."""
    from distill.core.labels import rule_of

    rule, kept = rule_of(task), {}
    with open(out, "w") as f:
        for r in read_fasta(path):
            key = rule.parse(r.description.split()[0], str(path))[0]
            kept[key] = kept.get(key, 0) + 1
            if kept[key] <= n:
                f.write(f">{r.id} {r.description}\n{r.sequence}\n")
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny student with Pfam and SCOPe heads, imported into a private model store and served; ESM comparison on."""
    root = tmp_path_factory.mktemp("svc")
    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]  # for `distill import` in this process
    torch.manual_seed(0)
    bundle = save_bundle(root / "tiny" / "student", ESM(ModelConfig(2, 32, 4, 64)), "custom")
    for task, data in (("pfam", "pfam.fasta"), ("scope", "scope.fasta")):
        res = runner.invoke(app, ["probe", str(bundle), "--data", str(EXAMPLES / data), "--task", task, "--min-per-class", "5"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(
            app,
            [
                "probe",
                str(TEACHER),
                "--data",
                str(first_per_label(EXAMPLES / data, task, root / f"teacher-{data}")),
                "--task",
                task,
                "--min-per-class",
                "5",
                "--out",
                str(root / "teacher-heads" / task),
            ],
        )
        assert res.exit_code == 0, res.output
    species = r"\{([^\[}]*?)\s*(?:\[|\})"  # a free task: the species in ASTRAL headers, '{Human (Homo sapiens) [TaxId: 9606]}'
    res = runner.invoke(
        app,
        [
            "probe",
            str(bundle),
            "--data",
            str(EXAMPLES / "scope.fasta"),
            "--task",
            "species",
            "--label-regex",
            species,
            "--min-per-class",
            "5",
        ],
    )
    assert res.exit_code == 0, res.output
    card = bundle / "heads" / "species" / "labels.json"  # species scans proteins in windows, every window a hit
    head = json.loads(card.read_text())
    head["calibration"] = head.get("calibration", {}) | {"scan": {"window": SCAN[0], "stride": SCAN[1]}, "threshold": 0.0}
    card.write_text(json.dumps(head))
    res = runner.invoke(app, ["import", str(bundle)])
    assert res.exit_code == 0, res.output
    tag = res.output.strip().splitlines()[-1]
    index_args = [
        "index",
        str(bundle),
        "--data",
        str(EXAMPLES / "pfam.fasta"),
        "--task",
        "pfam",
        "--align",
        "20",
        "-o",
        str(root / "index"),
    ]
    res = runner.invoke(app, index_args)
    assert res.exit_code == 0, res.output
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "distill",
        "serve",
        tag,
        "--port",
        str(port),
        "--compare-with",
        str(TEACHER),
        "--compare-head-dir",
        str(root / "teacher-heads"),
        "--reference",
        str(root / "index"),
        "--max-residues",
        "20000",
        "--client-timeout",
        str(CLIENT_TIMEOUT),
    ]
    proc = start_session(
        cmd,
        env=env,
        stdout=open(root / "serve.log", "w"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, root / "serve.log")
    from bentoml.models import get

    stored = Path(get(tag).path)
    yield {"url": url, "tag": tag, "graph": stored / "model.onnx", "root": root, "env": env, "bundle": bundle, "index": root / "index"}
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    os.environ.pop("BENTOML_HOME", None)


@pytest.fixture(scope="module")
def direct(server):
    """The same graph run in-process: what every HTTP answer must equal."""
    from distill.inference import resolve

    emb = resolve(server["graph"])
    return emb, {s: e for s, e in zip(SEQS, emb.embed(SEQS, cls=True), strict=True)}


def test_embed_and_classify_equal_direct_onnx_inference_in_input_order(server, direct):
    import bentoml

    emb, ref = direct
    with bentoml.SyncHTTPClient(server["url"]) as client:
        out = client.embed(sequences=SEQS[:9], pooling="mean")
        cls = client.embed(sequences=SEQS[:3], pooling="cls", per_residue=True)
        calls = client.classify(sequences=SEQS[:5], tasks=["pfam", "scope", "species"], top_k=3)
        packed = client.embed(sequences=SEQS[:3], pooling="cls", per_residue=True, encoding="float32-base64")
    assert out["dim"] == 32 and len(out["results"]) == 9
    for plain, binary in zip(cls["results"], packed["results"], strict=True):  # the same float32 values, as bytes
        assert binary["embedding"] == [] and binary["residues"] == []
        vector = np.frombuffer(base64.b64decode(binary["embedding_b64"]), "<f4")
        assert vector.tolist() == np.float32(plain["embedding"]).tolist()
        matrix = np.frombuffer(base64.b64decode(binary["residues_b64"]), "<f4").reshape(-1, 32)
        np.testing.assert_array_equal(matrix, np.float32(plain["residues"]))
    for seq, r in zip(SEQS[:9], out["results"], strict=True):
        np.testing.assert_allclose(r["embedding"], ref[seq].sequence, atol=1e-5)
    for seq, r in zip(SEQS[:3], cls["results"], strict=True):
        np.testing.assert_allclose(r["embedding"], ref[seq].cls, atol=1e-5)
        assert np.asarray(r["residues"]).shape == (len(seq), 32)
    from distill.inference.scan import scan

    assert emb.scan_of("species") == SCAN and emb.scan_of("pfam") is None
    for seq, r in zip(SEQS[:5], calls["results"], strict=True):
        for task in ("pfam", "scope", "species"):  # species: a free task, labels as written ("Human (Homo sapiens)")
            p = scan(emb, [seq], task, *SCAN)[0].best if task == "species" else ref[seq].probabilities[task]  # its best windows
            order = np.argsort(-p)[:3]
            assert [c["label"] for c in r["calls"][task]] == [emb.labels[task][i] for i in order]
            np.testing.assert_allclose([c["probability"] for c in r["calls"][task]], p[order], atol=1e-5)


def test_info_health_openapi_and_bentoml_endpoints(server):
    status, info = post(f"{server['url']}/info", {})
    assert status == 200 and info["tag"] == server["tag"] and info["backend"] == "student-onnx"
    assert info["provider"] == "CPUExecutionProvider" and set(info["labels"]) == {"pfam", "scope", "species"} and info["max_length"] == 1022
    assert info["reference"]["available"] and info["reference"]["model"] == "tiny_esm1b_t4_192"  # the spec's display name: the file's stem
    assert info["batching"] is False  # the default: the model in the API process
    assert post(f"{server['url']}/health", {}) == (
        200,
        {"status": "ok", "model": info["model"], "backend": "student-onnx", "provider": "CPUExecutionProvider"},
    )
    spec = json.loads(urllib.request.urlopen(f"{server['url']}/docs.json").read())
    assert spec["openapi"].startswith("3.")
    for path in ("/embed", "/classify", "/compare", "/annotate", "/info", "/health"):
        assert "post" in spec["paths"][path], path
    from openapi_spec_validator import validate

    # BentoML's own task-queue schema (TaskStatusResponse, not part of our API) uses a JSON-Schema null type
    # that OpenAPI 3.0 lacks; everything of ours must validate.
    spec["components"]["schemas"].pop("TaskStatusResponse", None)
    validate(spec)
    for path in ("/livez", "/metrics"):
        assert urllib.request.urlopen(f"{server['url']}{path}").status == 200


@pytest.mark.parametrize(
    ("endpoint", "payload", "message"),
    [
        ("embed", b"{not json", "json"),
        ("embed", {"sequences": "MKV"}, "sequences"),
        ("classify", {"sequences": ["MKV"], "top_k": "three"}, "top_k"),
        ("classify", {"sequences": ["MKV"], "tasks": ["pfam"], "top_k": "3"}, "top_k: Input should be a valid integer"),
        ("classify", {"sequences": ["MKV"], "tasks": ["pfam"], "top_k": 2.0}, "top_k: Input should be a valid integer"),
        ("embed", {"sequences": ["MKV"], "crop": "yes"}, "crop: Input should be a valid boolean"),
        ("embed", {"sequences": ["MKV"], "encoding": "npy"}, "encoding: Input should be 'json' or 'float32-base64'"),
        ("embed", {"sequences": ["MKV"], "per_resdue": True}, "unknown field(s) ['per_resdue'] for /embed"),
        ("embed", {"sequences": []}, "sequences is empty"),
        ("embed", {"sequences": ["MKV", " "]}, "sequence 2: empty sequence"),
        ("embed", {"sequences": ["MKV", "MKVLAJ"]}, "sequence 2: illegal residue 'J' at position 6"),
        ("embed", {"sequences": ["MKßT"]}, "sequence 1: illegal residue 'ß' at position 3"),
        ("embed", {"sequences": ["M1ß"]}, "sequence 1: illegal residue '1' at position 2"),  # the first bad one, ASCII or not
        ("classify", {"sequences": ["Mıſﬃ"]}, "sequence 1: illegal residue 'ı' at position 2"),
        ("embed", {"sequences": ["ß" * 600], "crop": True}, "sequence 1: illegal residue 'ß' at position 1"),
        ("embed", {"sequences": ["M" * 1023]}, "sequence 1: 1023 residues exceed the limit of 1022 (ask for crop"),
        ("embed", {"sequences": ["MKV"] * 65}, "65 sequences in one request; the limit is 64"),
        ("embed", {"sequences": ["M" * 1000] * 21}, "21000 residues in one request; the limit is 20000"),
        ("classify", {"sequences": ["MKV"], "tasks": ["go"]}, "unknown task(s) ['go']"),
        ("classify", {"sequences": ["MKV"], "tasks": ["pfam"], "top_k": 0}, "top_k must be between 1 and 20"),
        ("classify", {"sequences": ["MKV"], "tasks": ["pfam"], "top_k": 500}, "top_k must be between 1 and 20"),
        ("compare", {"sequences": ["MKV"], "tasks": ["go"]}, "unknown task(s) ['go']"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_problem_and_the_server_stays_up(server, endpoint, payload, message):
    status, body = post(
        f"{server['url']}/{endpoint}", None if isinstance(payload, bytes) else payload, payload if isinstance(payload, bytes) else None
    )
    assert 400 <= status < 500, (status, body)
    assert message.lower() in str(body).lower(), body
    assert post(f"{server['url']}/health", {})[0] == 200


def test_client_errors_are_one_warning_line_in_the_server_log(server):
    marker = "MKVQJ"  # an illegal J, easy to find in the log
    assert post(f"{server['url']}/embed", {"sequences": [marker]})[0] == 400
    for _ in range(50):  # the log is written asynchronously: poll, bounded
        lines = (server["root"] / "serve.log").read_text().splitlines()
        mine = [i for i, line in enumerate(lines) if "illegal residue 'J' at position 5" in line]
        if mine:
            break
        time.sleep(0.1)
    assert mine and "[WARNING]" in lines[mine[-1]] and "400 on /embed [POST]" in lines[mine[-1]]
    assert not any(line.startswith("Traceback") for line in lines[mine[-1] - 3 : mine[-1] + 3])


def test_crop_is_opt_in_per_request(server, direct):
    emb, _ = direct
    long = SEQS[0] * 12
    status, body = post(f"{server['url']}/embed", {"sequences": [long], "crop": True})
    assert status == 200 and body["results"][0]["cropped"] is True
    np.testing.assert_allclose(body["results"][0]["embedding"], emb.embed([long[:1022]])[0].sequence, atol=1e-5)


def test_compare_returns_both_models_agreement_and_latency(server):
    from distill.inference import resolve

    status, body = post(f"{server['url']}/compare", {"sequences": SEQS[:6], "tasks": ["pfam"], "top_k": 2})
    assert status == 200, body
    ref = resolve(str(TEACHER), str(server["root"] / "teacher-heads"))
    want = [ref.labels["pfam"][int(np.argmax(e.probabilities["pfam"]))] for e in ref.embed(SEQS[:6], tasks=["pfam"])]
    got_ref = [r["calls"]["pfam"][0]["label"] for r in body["reference"]["results"]]
    got_student = [r["calls"]["pfam"][0]["label"] for r in body["student"]["results"]]
    assert got_ref == want
    assert body["top1_agreement"]["pfam"] == pytest.approx(np.mean([a == b for a, b in zip(got_ref, got_student, strict=True)]))
    assert body["student"]["seconds"] > 0 and body["reference"]["seconds"] > 0


def test_compare_without_a_reference_says_why(monkeypatch):
    from serve import service

    monkeypatch.setattr(service, "ARGS", service.ARGS.model_copy(update={"compare": ""}))
    ref = service.Reference.inner()
    assert ref.infer(["MKV"]) == {"available": False, "reason": ref.reason, "model": "", "labels": {}}
    assert "--compare-with esm1b_t33_650M_UR50S" in ref.reason


def test_concurrent_clients_of_mixed_lengths_never_get_each_others_answers(server, direct):
    """32 clients x 20 requests (ESM_DISTILL_LOAD_REQUESTS=500 for the full load test) of 1-4 sequences while two
    busy-loop processes hog both cores: every answer is 200 and equal to its sequences' own embeddings. Bounded by
    work: each request waits for its answer (the service's own timeouts apply), nothing here watches the clock."""
    _, ref = direct
    rng = np.random.default_rng(0)
    per_client = int(os.environ.get("ESM_DISTILL_LOAD_REQUESTS", "20"))
    jobs = [[SEQS[i] for i in rng.choice(len(SEQS), rng.integers(1, 5), replace=False)] for _ in range(32 * per_client)]

    def call(seqs):
        status, body = post(f"{server['url']}/embed", {"sequences": seqs})
        assert status == 200, body
        return all(np.allclose(r["embedding"], ref[s].sequence, atol=1e-5) for s, r in zip(seqs, body["results"], strict=True))

    hogs = [start_session([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(call, jobs))
    finally:
        for h in hogs:
            os.killpg(h.pid, signal.SIGKILL)
            h.wait()
    assert len(results) == 32 * per_client and all(results)


def test_annotate_through_the_service_equals_local_annotation(server, tmp_path):
    from distill.inference import resolve
    from distill.recipes.annotate import Options, annotate

    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(SEQS[:20])) + ">bad\nMKJ\n>long\n" + SEQS[0] * 14 + "\n")
    local = annotate(
        fasta, resolve(server["graph"]), tmp_path / "local.tsv", Options(top_k=2, embeddings=tmp_path / "local.npy", quiet=True)
    )
    remote = annotate(
        fasta, resolve(server["url"]), tmp_path / "remote.tsv", Options(top_k=2, embeddings=tmp_path / "remote.npy", quiet=True)
    )
    assert (local.ok, local.errors) == (remote.ok, remote.errors) == (21, 1)
    assert (tmp_path / "local.tsv").read_text() == (tmp_path / "remote.tsv").read_text()
    np.testing.assert_allclose(np.load(tmp_path / "local.npy"), np.load(tmp_path / "remote.npy"), atol=1e-5)


def test_bentoml_build_works_offline(server):
    res = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag", "--arg", f"model={server['tag']}"],
        cwd=REPO, env=server["env"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    bento_tag = res.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    import yaml
    from bentoml import get as get_bento

    os.environ["BENTOML_HOME"] = server["env"]["BENTOML_HOME"]
    card = yaml.safe_load((Path(get_bento(bento_tag).path) / "bento.yaml").read_text())
    api = next(s for s in card["services"] if s["name"] == "esm-distill")  # one process: the API service holds the model
    assert [m["tag"] for m in api["models"]] == [server["tag"]]


def test_esm1b_backend_serves_a_fair_esm_checkpoint_with_its_heads(server):
    """`--backend esm1b`: the teacher itself behind the same API (here the bundled tiny ESM-1b-format checkpoint)."""
    from distill.inference import resolve

    port = free_port()
    heads = server["root"] / "teacher-heads"
    cmd = [sys.executable, "-m", "distill", "serve", str(TEACHER), "--backend", "esm1b", "--head-dir", str(heads), "--port", str(port)]
    proc = start_session(
        cmd,
        env=server["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        status, body = post(f"{url}/classify", {"sequences": SEQS[:4], "tasks": ["scope"], "top_k": 1})
        assert status == 200, body
        ref = resolve(str(TEACHER), str(heads))
        want = [ref.labels["scope"][int(np.argmax(e.probabilities["scope"]))] for e in ref.embed(SEQS[:4], tasks=["scope"])]
        assert [r["calls"]["scope"][0]["label"] for r in body["results"]] == want
        status, info = post(f"{url}/info", {})
        assert info["backend"] == "esm1b" and info["provider"] == "torch-cpu" and info["parameters"] == 2021025
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_classify_flags_no_calls_and_lists_reference_neighbours(server):
    from distill.core.calibration import shuffled
    from distill.core.heads import heads_of
    from distill.inference import resolve
    from distill.inference.index import load_index
    from distill.inference.scan import scan, segment

    status, info = post(f"{server['url']}/info", {})
    heads = heads_of(server["bundle"])
    assert status == 200 and info["min_probability"] == pytest.approx({t: h.min_probability for t, h in heads.items()})
    assert info["reference_index"]["count"] == 810 and info["reference_index"]["task"] == "pfam"
    seqs = SEQS[:4] + shuffled(SEQS[:2], 0)
    status, body = post(f"{server['url']}/classify", {"sequences": seqs, "top_k": 3})
    assert status == 200, body
    index = load_index(server["index"])
    onnx = resolve(server["graph"])
    vectors = np.stack([e.sequence for e in onnx.embed(seqs)])
    scans = scan(onnx, seqs, "species", *SCAN)
    nn = index.search(vectors, 3, seqs, domains=True)  # an aligning index: neighbours by E-value, the call their vote
    for i, r in enumerate(body["results"]):
        for t, calls in r["calls"].items():
            assert r["no_call"][t] == (calls[0]["probability"] < info["min_probability"][t])
        assert [n["id"] for n in r["neighbours"]] == nn.ids[i]
        assert [n["similarity"] for n in r["neighbours"]] == pytest.approx(nn.similarities[i].tolist(), abs=1e-5)
        assert [n["evalue"] for n in r["neighbours"]] == pytest.approx(np.exp(-nn.evidence[i]).tolist(), rel=1e-4)
        verdict = index.verdict(nn.calls[i], float(nn.call_scores[i]))
        assert r["reference_call"] == (nn.calls[i] if verdict == "call" else "-")
        assert r["related_to"] == (nn.calls[i] if verdict == "related" else "")
        assert r["reference_score"] == pytest.approx(float(nn.call_scores[i]), rel=1e-5)
        want = [(d.start, d.end, d.label, "reference") for d in nn.domains[i] if index.verdict(d.label, d.score) != "no-call"]
        want += [(d.start, d.end, d.label, "species") for d in segment(scans[i], onnx.labels["species"], lambda label: 0.0)]
        assert [(d["start"], d["end"], d["label"], d["source"]) for d in r["domains"]] == want
    by_index = [[d for d in r["domains"] if d["source"] == "reference"] for r in body["results"]]
    assert all(by_index[:4]) and not any(by_index[4:])  # shuffles: none
    assert all(any(d["source"] == "species" for d in r["domains"]) for r in body["results"])  # every window is a hit


def test_int8_import_with_heads_passes_and_its_engine_answers_independently_of_the_batch(server):
    """`distill import --int8` of a bundle with heads (the quickstart's failure in the service issue), then the engine's
    inference object for the int8 variant: the same sequence gives identical answers in any batch."""
    from bentoml.models import get

    from serve.store import import_model, open_stored

    tag = import_model(str(server["bundle"]), "esm-distill-int8", int8=True)
    assert import_model(str(server["bundle"]), "esm-distill-int8", int8=True) == tag  # same content: imported once
    assert import_model(str(server["bundle"]), "esm-distill-int8") != tag  # without the int8 graph: another version
    engine = open_stored(Path(get(tag).path), "student-onnx", "int8")
    assert engine.backend.max_rows == 1 and set(engine.labels) == {"pfam", "scope", "species"}
    # the service's sessions run without ONNX Runtime's memory arena, so a burst's memory comes back (serve_memory.py)
    assert engine.backend.session.get_session_options().enable_cpu_mem_arena is False
    mixed = engine.embed(SEQS[:8], tasks=["pfam"])
    for seq, e in zip(SEQS[:8], mixed, strict=True):
        alone = engine.embed([seq], tasks=["pfam"])[0]
        np.testing.assert_array_equal(e.sequence, alone.sequence)
        np.testing.assert_array_equal(e.probabilities["pfam"], alone.probabilities["pfam"])


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, pgrp, ...; a gone process reads as a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return ["Z", "0", "0"]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(stat.parent.name)
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_or_killing_distill_serve_leaves_no_server_behind(server, direct, tmp_path, sig):
    """SIGTERM is forwarded to the server's supervisor; after SIGKILL the supervisor stops it. Either way every
    process below `distill serve`, in whatever group, is gone and the port is free within 15 s. The SIGTERM server
    runs the two-service topology (--batching: the model in its own Engine service), and answers like the
    one-process one. The API key (given in the environment) is on no process's command line, nor in a file left.
    Requests of every kind are in flight when the signal comes (finding 2 hung on such a request for minutes)."""
    from serve.supervisor import descendants

    port, key = free_port(), "k3y-that-must-not-leak"
    batching = sig == signal.SIGTERM
    # a short client timeout: the half-sent body below is answered (408) within it, and the graceful stop waits for it
    cmd = [sys.executable, "-m", "distill", "serve", server["tag"], "--port", str(port), "--client-timeout", "2"]
    cmd += ["--batching"] if batching else []
    proc = start_session(cmd, env=server["env"] | {"ESM_DISTILL_API_KEY": key}, stdout=open(tmp_path / "log", "w"),
                         stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
    groups: set[int] = set()
    inflight: list[socket.socket] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, tmp_path / "log")
        below = descendants(proc.pid)
        supervisor = [p for p in below if int(_stat(p)[1]) == proc.pid]
        assert len(supervisor) == 1 and set(below) == {supervisor[0], *descendants(supervisor[0])}  # all of it below one
        groups = {os.getpgid(p) for p in below} - {os.getpgid(proc.pid)}  # the supervisor's, the server's, each worker's
        arg_dirs = {
            Path(a).parent for p in below for a in Path(f"/proc/{p}/cmdline").read_bytes().decode().split("\0") if a.endswith("args.json")
        }
        assert len(arg_dirs) == 1 and next(iter(arg_dirs)).is_dir()
        for pid in below:
            with contextlib.suppress(OSError):
                assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), Path(f"/proc/{pid}/cmdline").read_bytes()
        assert post(f"http://127.0.0.1:{port}/info", {})[0] == 401 and post(f"http://127.0.0.1:{port}/info", {}, key=key)[0] == 200
        as_json = {"Content-Type": "application/json"}
        lower = _request(f"http://127.0.0.1:{port}/info", b"{}", as_json | {"Authorization": f"bearer {key}"})  # RFC 7235: any case
        bare = _request(f"http://127.0.0.1:{port}/info", b"{}", as_json | {"Authorization": key})  # no scheme: no Bearer credential
        assert lower[0] == 200 and bare[0] == 401 and bare[1]["www-authenticate"].startswith("Bearer")
        if batching:
            status, body = post(f"http://127.0.0.1:{port}/embed", {"sequences": SEQS[:3]}, key=key)
            assert status == 200, body
            for seq, r in zip(SEQS[:3], body["results"], strict=True):
                np.testing.assert_allclose(r["embedding"], direct[1][seq].sequence, atol=1e-5)
            assert post(f"http://127.0.0.1:{port}/info", {}, key=key)[1]["batching"] is True
        # requests of every kind in flight when the signal comes: large ones being embedded, a body half sent (hangs
        # until the client timeout), an idle connection
        body = json.dumps({"sequences": ["MKTAYIAKQRQISFVKSHFSRQ" * 45] * 8}).encode()
        head = (f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        inflight = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(5)]
        for s, data in zip(inflight, [head + body] * 3 + [head + body[:100], b""], strict=True):
            s.sendall(data)
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)

        def left() -> list[int]:
            return [p for p in below if Path(f"/proc/{p}").exists() and _stat(p)[0] != "Z"] + [m for g in groups for m in _group_members(g)]

        for _ in range(150):  # bounded by polls, 15 s
            if not left():
                break
            time.sleep(0.1)
        assert not left(), left()
        assert not any(d.exists() for d in arg_dirs)  # the argument file goes on every exit path (SIGKILL included)
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # nobody listens any more
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a new server would: old connections may linger in TIME_WAIT
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        for s in inflight:
            s.close()
        for g in groups | {proc.pid}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, signal.SIGKILL)


def _rss_mb(pattern: str) -> float:
    """Resident memory of the first process whose command line contains ``pattern``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if pattern in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                status = (cmdline.parent / "status").read_text()
                return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
        except (OSError, StopIteration):
            continue
    raise AssertionError(f"no process matches {pattern!r}")


def _raw_post(port: int, headers: str, chunks) -> bytes:
    """Send a request piece by piece; stop sending as soon as the server answers (it may close early)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(headers.encode())
        s.setblocking(False)
        answer = b""
        for chunk in chunks:
            try:
                answer += s.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            try:
                s.sendall(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        s.setblocking(True)
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                more = s.recv(65536)
                if not more:
                    break
                answer += more
        except (ConnectionResetError, TimeoutError):
            pass
        return answer


def test_oversized_bodies_get_413_before_parsing_and_memory_stays_flat(server):
    """200 MB declared, or streamed without a length: refused after reading at most the limit (25,120 bytes here
    with --max-residues 20000), while the API worker's memory stays within 50 MB of where it was."""
    port = int(server["url"].rsplit(":", 1)[1])
    api = "--service-name esm-distill --"
    before = _rss_mb(api)
    megabyte = b'{"sequences": ["' + b"M" * (1 << 20)
    declared = _raw_post(
        port, f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {200 << 20}\r\n\r\n", [megabyte] * 200
    )
    assert declared.startswith(b"HTTP/1.1 413") and b"exceeds the limit of 25," in declared, declared[:300]
    chunked = ((b"%x\r\n" % len(megabyte)) + megabyte + b"\r\n" for _ in range(200))
    streamed = _raw_post(
        port, "POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", chunked
    )
    assert streamed.startswith(b"HTTP/1.1 413") and b"request body of more than" in streamed, streamed[:300]
    assert _rss_mb(api) - before < 50
    status, body = post(f"{server['url']}/embed", {"sequences": ["MKV"]})  # and the server is still up
    assert status == 200
    plain = urllib.request.Request(f"{server['url']}/embed", data=b'{"sequences": ["MKV"]}', headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(plain, timeout=30)
    assert e.value.code == 415 and json.loads(e.value.read())["error"]["status"] == 415


def test_huge_numbers_and_deep_nesting_are_answered_400_by_the_real_server(server):
    """Finding 1 against a running service: these bodies hung for 600 s, then got a plain-text 500."""
    digits = b'{"sequences": ["MKT"], "top_k": ' + b"9" * 5000 + b"}"
    for endpoint, body, message in (("classify", digits, "request body is not valid JSON"),
                                    ("embed", b"[" * 1000 + b"]" * 1000, "request JSON nests deeper than 32 levels"),
                                    ("health", b"[" * 1000 + b"]" * 1000, "request JSON nests deeper than 32 levels")):  # fmt: skip
        status, answer = post(f"{server['url']}/{endpoint}", None, raw=body)
        assert status == 400 and message in json.loads(answer)["error"]["message"], (endpoint, status, answer)
    assert post(f"{server['url']}/embed", {"sequences": ["MKT"]})[0] == 200  # and it still serves


def _together(port: int, n: int, body: bytes) -> list[bytes]:
    """``n`` POST /embed whose bodies complete together: all but the last byte sent on every socket, then the last
    bytes in one loop; the raw answers in order."""
    head = f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=120) for _ in range(n)]
    try:
        for s in socks:
            s.sendall(head + body[:-1])
        for s in socks:
            s.sendall(body[-1:])
        return [_one_answer(s) for s in socks]
    finally:
        for s in socks:
            s.close()


def _one_answer(s: socket.socket) -> bytes:
    """One whole HTTP answer (head + Content-Length bytes) from a keep-alive connection."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += s.recv(1 << 16) or pytest.fail(f"connection closed before an answer: {answer[:200]!r}")
    head, _, rest = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        rest += s.recv(1 << 20) or pytest.fail("connection closed inside an answer")
    return head + b"\r\n\r\n" + rest


def test_a_full_worker_answers_503_with_retry_after_and_frees_its_slots(server):
    """Finding 4 against a running service (cap 8, the default): of 16 requests whose bodies complete together, those
    past the cap are refused at once with 503, Retry-After and the JSON error shape, the rest are answered; then 8
    at once are all admitted (no slot leaked), and the idle worker's memory is back within 100 MB of where it was
    before the burst (measured: 207 -> 160 MB). No clock decides it: the bodies complete within one loop over the
    sockets, while each admitted request embeds 8,000 residues."""
    port = int(server["url"].rsplit(":", 1)[1])
    body = json.dumps({"sequences": ["MKTAYIAKQRQISFVKSHFSRQ" * 45] * 8}).encode()  # 8 x 990 residues
    api = "--service-name esm-distill --"
    _together(port, 8, body)  # warm: the shapes of such requests allocated once
    before = _rss_mb(api)
    answers = _together(port, 16, body)
    status = [int(a.split(b" ", 2)[1]) for a in answers]
    assert set(status) == {200, 503} and status.count(200) >= 8, status
    busy = next(a for a in answers if a.startswith(b"HTTP/1.1 503"))
    assert b"retry-after: 1" in busy.lower() and b'"status": 503' in busy and b"requests in flight, its limit" in busy
    plain = urllib.request.Request(f"{server['url']}/embed", data=b'{"sequences": ["MKV"]}', headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(plain, timeout=120) as r:  # no retry: a leaked slot would show as 503
        assert r.status == 200
    assert [a.split(b" ", 2)[1] for a in _together(port, 8, body)] == [b"200"] * 8
    after = _rss_mb(api)  # idle again: the burst's heap handed back (malloc_trim when the last request ends)
    assert after - before < 100, (before, after)


def _request(url: str, data: bytes | None, headers: dict[str, str], method: str | None = None) -> tuple[int, dict, bytes]:
    """(status, lower-case headers, body) of one request, no retry."""
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_other_methods_paths_and_codings_are_answered_in_the_json_error_shape_by_the_real_server(server):
    """Finding 6 against a running service: 404 and 405 were plain text, a gzip body's 415 did not say why."""
    url = server["url"]
    for method, path, status, message in (("GET", "/embed", 405, "Method Not Allowed"), ("GET", "/nowhere", 404, "Not Found"),
                                          ("PUT", "/classify", 405, "Method Not Allowed")):  # fmt: skip
        code, headers, body = _request(url + path, b"{}" if method == "PUT" else None, {"Content-Type": "application/json"}, method)
        assert code == status and headers["content-type"].startswith("application/json"), (path, code, body)
        assert json.loads(body) == {"error": {"status": status, "message": message}}
    import gzip

    code, _, body = _request(url + "/embed", gzip.compress(b'{"sequences": ["MKV"]}'),
                             {"Content-Type": "application/json", "Content-Encoding": "gzip"})  # fmt: skip
    assert code == 415 and "compressed bodies are not supported (Content-Encoding: gzip)" in json.loads(body)["error"]["message"]


def test_an_oversized_request_head_gets_431_from_the_real_server(server):
    """Finding 5 against a running service: a 64 MB request header was read whole and answered 200."""
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431") and b'"status": 431' in answer, answer[:300]


def test_slow_clients_are_closed_or_refused_after_the_client_timeout(server):
    """Connections that send nothing, half a request line, or half the headers are closed; a body that stops
    arriving gets 408; an idle connection after an answer is closed too. None of them before the timeout, and a
    request sent at once is unaffected (bounded by work: each socket waits for the server, 60 s at most)."""
    port = int(server["url"].rsplit(":", 1)[1])
    ok = b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n"
    sends = {
        "nothing": b"",
        "half a request line": b"POST /emb",
        "half the headers": b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Ty",
        "half the body": ok + b'{"sequences": ',
        "idle after an answer": ok + b'{"sequences": ["MKV"]}',
    }
    socks, start = {}, time.monotonic()
    for name, data in sends.items():
        socks[name] = socket.create_connection(("127.0.0.1", port), timeout=60)
        socks[name].sendall(data)
    closed_after = {}
    for name, s in socks.items():
        answer = b""
        with s:
            while chunk := s.recv(65536):  # until the server closes (b"") or the 60-s socket timeout fails the test
                answer += chunk
        closed_after[name] = (time.monotonic() - start, answer)
    for name, (elapsed, _) in closed_after.items():
        assert elapsed >= CLIENT_TIMEOUT * 0.9, (name, elapsed)
    assert closed_after["nothing"][1] == closed_after["half a request line"][1] == closed_after["half the headers"][1] == b""
    assert (
        closed_after["half the body"][1].startswith(b"HTTP/1.1 408")
        and b"request body not complete within 4 s (14 bytes arrived)" in closed_after["half the body"][1]
    )
    assert closed_after["idle after an answer"][1].startswith(b"HTTP/1.1 200") and b'"embedding"' in closed_after["idle after an answer"][1]


def test_a_hugging_face_export_is_importable_and_serves_like_its_bundle(server, tmp_path):
    from bentoml.models import get

    from distill.inference import resolve
    from serve.store import import_model, open_stored

    res = runner.invoke(app, ["export", "hf", str(server["bundle"]), "-o", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    engine = open_stored(Path(get(import_model(str(tmp_path / "hf"), "esm-distill-hf")).path))
    want = resolve(server["bundle"]).embed(SEQS[:4], tasks=["pfam"])
    for a, b in zip(engine.embed(SEQS[:4], tasks=["pfam"]), want, strict=True):
        np.testing.assert_allclose(a.sequence, b.sequence, atol=1e-5)
        np.testing.assert_allclose(a.probabilities["pfam"], b.probabilities["pfam"], atol=1e-5)


def raw_request(port: int, data: bytes) -> tuple[int, str, dict]:
    """One raw HTTP request -> (status, content type, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
            next((line.split(b":")[1] for line in answer.split(b"\r\n") if line.lower().startswith(b"content-length")), b"0")
        ):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, body = answer.split(b"\r\n\r\n", 1)
    kind = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n") if line.lower().startswith(b"content-type")), "")
    return int(head.split()[1]), kind, json.loads(body)


def test_the_shipped_nginx_front_passes_requests_and_refuses_bad_http_in_the_services_json_shape(server, tmp_path):
    import shutil

    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light): the front in deploy/nginx.conf is not exercised")
    port, upstream = free_port(), server["url"].rsplit(":", 1)[1]
    conf = (REPO / "deploy" / "nginx.conf").read_text()
    conf = conf.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace("127.0.0.1:3000", f"127.0.0.1:{upstream}")
    (tmp_path / "nginx.conf").write_text(conf)
    proc = start_session([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
                         stdout=open(tmp_path / "log", "w"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, tmp_path / "log")
        status, direct = post(f"{server['url']}/classify", {"sequences": SEQS[:2], "top_k": 1})
        assert status == 200 and post(f"http://127.0.0.1:{port}/classify", {"sequences": SEQS[:2], "top_k": 1}) == (200, direct)
        status, kind, body = raw_request(port, b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        assert (status, kind) == (400, "application/json") and "malformed HTTP request" in body["error"]["message"]
        status, kind, body = raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        assert (status, body["error"]["status"]) == (400, 400) and "over 16 KB" in body["error"]["message"]
        status, kind, body = raw_request(port, b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 70000000\r\n\r\n")
        assert status == 413 and body == {"error": {"status": 413, "message": "request body over 64 MB (refused by the front proxy)"}}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
