import contextlib
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from loratag.config import Config
from loratag.serve.adapters import parse_runs
from loratag.serve.app import create_app
from loratag.serve.pool import AdapterPool
from loratag.serve.settings import ServeSettings
from loratag.tagger import Tagger
from loratag.train import train

from .conftest import RESOURCES, guide_lora, guide_train

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

TEXTS = [
    "IL-2 gene expression requires NF-kappa B.",
    "T cells express CD28. Human monocytes bind B7 (in vitro).",
    "The c-fos gene in T cells is bound by NF-kappa B and IL-2 binds its receptor on human monocytes.",
    "",
]


def _cfg(base: Path, data=RESOURCES / "tiny", bias="none", seed=0, lr=0.05, epochs=1) -> Config:
    return Config(
        model=str(base),
        data=str(data),
        lora=guide_lora(r=4, alpha=8, bias=bias),
        train=guide_train(lr=lr, batch_size=4, epochs=epochs, seed=seed, checkpoint_minutes=0),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert) -> list[Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    return [
        train(_cfg(tiny_bert, seed=s, lr=lr, epochs=e), root / name, progress=False)
        # "cells" trains long enough to find entities in the tiny corpus's sentences (the browser test needs some)
        for s, lr, e, name in ((0, 0.05, 1, "genes"), (1, 0.02, 40, "cells"), (2, 0.03, 3, "proteins"))
    ]


@pytest.fixture(scope="module")
def pool(runs) -> AdapterPool:
    return AdapterPool([(r, r.name) for r in runs])


@pytest.fixture(scope="module")
def client(pool):
    app, _ = create_app(pool, ServeSettings(max_body_bytes=4096, max_text_chars=500, wait_ms=2))
    with TestClient(app) as c:
        yield c


def alone(run: Path, texts: list[str]) -> list[dict]:
    return [d.to_dict() for d in Tagger.load(run).tag_documents(texts)]


def same(a: list[dict], b: list[dict]) -> None:
    """Identical texts, entity spans and labels; scores equal to 1e-3 (float sums may differ in the last bits
    with the batch's padded length)."""
    assert [d["text"] for d in a] == [d["text"] for d in b]
    for da, db in zip(a, b):
        assert [(e["text"], e["label"], e["start"], e["end"]) for e in da["entities"]] == [
            (e["text"], e["label"], e["start"], e["end"]) for e in db["entities"]
        ]
        assert [e["score"] for e in da["entities"]] == pytest.approx([e["score"] for e in db["entities"]], abs=1e-3)


def test_tag_matches_predict(client, runs):
    for run in runs:
        r = client.post("/v1/tag", json={"adapter": run.name, "texts": TEXTS})
        assert r.status_code == 200, r.text
        assert r.json()["adapter"] == run.name
        same(r.json()["results"], alone(run, TEXTS))
        one = client.post("/v1/tag", json={"adapter": run.name, "text": TEXTS[0]}).json()
        same(one["results"], alone(run, TEXTS[:1]))


def test_adapters_differ(client, runs):
    got = {
        run.name: client.post("/v1/tag", json={"adapter": run.name, "texts": TEXTS}).json()["results"] for run in runs
    }
    scores = {name: [e["score"] for d in docs for e in d["entities"]] for name, docs in got.items()}
    assert len({json.dumps(v) for v in scores.values()}) > 1, "three adapters gave the same answers"


def test_adapters_health_metrics(client, runs):
    listed = client.get("/v1/adapters").json()["adapters"]
    assert [a["name"] for a in listed] == [r.name for r in runs]
    assert listed[0]["labels"][0] == "O" and set(listed[0]["metrics"]) == {"precision", "recall", "f1", "untyped_f1"}
    assert client.get("/healthz").json() == {"status": "ok", "adapters": 3}
    client.post("/v1/tag", json={"adapter": "nope", "text": "x"})
    text = client.get("/metrics").text
    for name in (
        "loratag_requests_total",
        "loratag_request_seconds_bucket",
        "loratag_batch_texts_bucket",
        "loratag_errors_total",
    ):
        assert name in text
    assert 'loratag_errors_total{status="404"}' in text
    client.post("/v1/tag", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert 'loratag_errors_total{status="413"}' in client.get("/metrics").text, "BodyLimit's 413 not counted"


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"adapter": "nope", "text": "x"}, 404, "known: genes, cells, proteins"),
        ({"text": "x"}, 422, "adapter"),
        ({"adapter": "genes", "text": "x", "extra": 1}, 422, "extra"),
        ({"adapter": "genes", "text": 5}, 422, "text"),
        ({"adapter": "genes"}, 422, "exactly one of 'text' or 'texts'"),
        ({"adapter": "genes", "texts": []}, 422, "1 to 256"),
        ({"adapter": "genes", "texts": ["x"] * 257}, 422, "1 to 256"),
        ({"adapter": "genes", "text": "x " * 200}, 200, "adapter"),
        ({"adapter": "genes", "text": "a" * 501}, 413, "limit is 500"),
        ({"adapter": "genes", "text": "a " * 3000}, 413, "request body over 4096 bytes"),
    ],
)
def test_bad_requests(client, body, status, needle):
    r = client.post("/v1/tag", json=body)
    assert r.status_code == status and needle in r.text


def test_malformed_json_is_422(client):
    r = client.post("/v1/tag", content=b'{"adapter": "genes", "text": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "json" in r.text.lower()


def test_full_queue_is_503_with_retry_after(pool, monkeypatch):
    """One request in the worker (held there), one in a queue of one: the next is answered 503 at once."""
    from concurrent.futures import ThreadPoolExecutor

    entered, release = threading.Event(), threading.Event()
    real = pool.tag

    def held(adapters, texts):
        entered.set()
        release.wait(60)
        return real(adapters, texts)

    monkeypatch.setattr(pool, "tag", held)
    wrapped, app = create_app(pool, ServeSettings(max_queue=1, workers=1, wait_ms=0))
    body = {"adapter": "genes", "text": "IL-2"}
    with TestClient(wrapped) as c, ThreadPoolExecutor(2) as ex:
        first = ex.submit(c.post, "/v1/tag", json=body)
        assert entered.wait(60)
        second = ex.submit(c.post, "/v1/tag", json=body)
        deadline = time.monotonic() + 60
        while app.state.batcher.queue.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/tag", json=body)
        release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_a_failing_batch_does_not_stop_the_server(pool, monkeypatch):
    app, _ = create_app(pool)
    real = pool.tag

    def flaky(adapters, texts):
        if "BOOM" in texts:
            raise RuntimeError("boom")
        return real(adapters, texts)

    monkeypatch.setattr(pool, "tag", flaky)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/v1/tag", json={"adapter": "genes", "text": "BOOM"}).status_code == 500
        assert c.post("/v1/tag", json={"adapter": "genes", "text": TEXTS[0]}).status_code == 200


def test_adapters_with_different_label_sets_share_one_server(runs, tiny_bert, tmp_path):
    """A 7-label adapter and a 3-label one (one entity type) on one base: each row of a mixed batch goes through its
    own head and decodes with its own labels, answering as loratag predict does for its adapter."""
    data = tmp_path / "dna-only"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.conll").write_text("IL-2\tB-DNA\ngene\tI-DNA\nbinds\tO\nDNA\tO\n")
    fewer = train(_cfg(tiny_bert, data=data, lr=0.05, epochs=30), tmp_path / "fewer", progress=False)
    pool = AdapterPool([(runs[1], "cells"), (fewer, "dna")])
    assert not pool.merged and [len(a.labels) for a in pool.adapters.values()] == [7, 3]
    texts = TEXTS[:3] * 2
    names = ["cells", "dna"] * 3
    served = [d.to_dict() for d in pool.tag(names, texts)]
    for name, run in (("cells", runs[1]), ("dna", fewer)):
        mine = [d for d, n in zip(served, names) if n == name]
        same(mine, alone(run, [t for t, n in zip(texts, names) if n == name]))
    assert any(e["label"] == "DNA" for d, n in zip(served, names) if n == "dna" for e in d["entities"])
    assert all(e["label"] == "DNA" for d, n in zip(served, names) if n == "dna" for e in d["entities"])


def test_refuses_adapters_that_cannot_share_the_base(runs, tiny_bert, tiny_roberta, tmp_path):
    other = train(_cfg(tiny_roberta), tmp_path / "other-base", progress=False, stop_after_steps=1)
    with pytest.raises(ValueError, match=r"other-base: base model .* differs"):
        AdapterPool([(runs[0], "a"), (other, "b")])
    with pytest.raises(ValueError, match="used twice"):
        AdapterPool([(runs[0], "a"), (runs[1], "a")])
    with pytest.raises(FileNotFoundError, match="expected a loratag run or a PEFT adapter"):
        AdapterPool([(tmp_path, "x")])


def test_parse_runs(runs, tmp_path):
    assert parse_runs([f"{runs[0]}:my-name"]) == [(runs[0], "my-name")]
    assert parse_runs([str(runs[1])]) == [(runs[1], "cells")]
    assert [n for _, n in parse_runs([], runs[0].parent)] == ["cells", "genes", "proteins"]


@contextlib.contextmanager
def running(app):
    """A real uvicorn server for ``app`` on a free loopback port, in a thread; yields its URL, then stops it."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(10)
    assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def server(pool):
    app, _ = create_app(pool, ServeSettings(wait_ms=20, workers=2))  # two workers, as `loratag serve` on 2 cores
    with running(app) as url:
        yield url


def test_concurrent_mixed_adapter_requests_answer_as_alone(server, runs):
    expected = {(run.name, i): alone(run, [t])[0] for run in runs for i, t in enumerate(TEXTS)}
    jobs = [(run.name, i) for _ in range(3) for run in runs for i in range(len(TEXTS))]

    def call(job):
        name, i = job
        r = httpx.post(f"{server}/v1/tag", json={"adapter": name, "text": TEXTS[i]}, timeout=60)
        return job, r.status_code, r.json()

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(call, jobs))
    for job, status, body in results:
        assert status == 200
        same(body["results"], [expected[job]])
    metrics = httpx.get(f"{server}/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith("loratag_batch_texts_count")]
    batches = float(sizes[0].split()[-1])
    assert batches < len(jobs), "no request was batched with another"


@pytest.fixture
def api_schema(runs, tmp_path):
    """Every route, the admin API's included (its own pool: the fuzzer may delete adapters), under a root that
    holds a run to add."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.generation import GenerationMode

    shutil.copytree(runs[0], tmp_path / "genes")
    pool = AdapterPool([(r, r.name) for r in runs], dynamic=True)
    app, _ = create_app(pool, ServeSettings(max_text_chars=2000), allow_roots=[tmp_path])
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # schema-valid bodies only: schemathesis's negative mode checks its mutations with jsonschema_rs, which cannot
    # take the lone surrogates of the text strategy below (malformed bodies: test_bad_requests)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE])
    return schema


try:
    import schemathesis
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st

    from loratag.serve.schemas import TEXT_FORMAT

    # texts as JSON can carry them: any code point, lone surrogates (Cs) and control characters (Cc) included,
    # mixed with the words a tagger sees
    ANY_TEXT = st.text(st.characters(codec=None, categories=None, exclude_categories=()), max_size=60) | st.lists(
        st.sampled_from(["IL-2", "binds", "NF-kappa", "B", ".", "\ud800", "\udfff", "\x00", "\x1b", "\u200b", " "])
    ).map("".join)
    schemathesis.openapi.format(TEXT_FORMAT, ANY_TEXT)
    fuzz_schema = schemathesis.pytest.from_fixture("api_schema")

    @fuzz_schema.parametrize()
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    def test_openapi_schema_fuzz_finds_no_5xx(case):
        response = case.call()
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)
except ImportError:  # the dev extra installs schemathesis; without it the fuzz test is not collected
    pass


def test_browser_page_highlights_entities(server, runs):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    expected = alone(runs[1], [TEXTS[1]])[0]["entities"]
    assert expected, "the test adapter finds no entity in this text; the check would be empty"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        page.goto(server + "/")
        page.wait_for_selector("#adapter option[value=cells]", state="attached")
        page.select_option("#adapter", "cells")
        page.fill("#text", TEXTS[1])
        page.click("#tag")
        page.wait_for_function("document.querySelector('#json').textContent.length > 0")
        marks = page.eval_on_selector_all(
            "#result mark.entity",
            "ms => ms.map(m => [m.firstChild.textContent, m.dataset.label, getComputedStyle(m).backgroundColor])",
        )
        result_text = page.inner_text("#result")
        legend = page.inner_text("#legend")
        browser.close()
    assert [(m[0], m[1]) for m in marks] == [(e["text"], e["label"]) for e in expected]
    assert all(m[2] not in ("", "rgba(0, 0, 0, 0)") for m in marks)
    assert TEXTS[1].split()[0] in result_text
    assert all(label in legend for label in ("DNA", "protein", "cell_type"))


def test_an_unstackable_adapter_is_served_alone_merged(runs, monkeypatch):
    """Where an adapter cannot be stacked (multilora.weights_of raises Unstackable), it is served alone, merged into
    its base as predict runs it; with others, or with adapters that come and go, it is refused with the reason."""
    from loratag.serve import multilora

    stacked = AdapterPool([(r, r.name) for r in runs])

    def unstackable(*a, **k):
        raise multilora.Unstackable("test: as if an adapter used DoRA")

    monkeypatch.setattr(multilora, "weights_of", unstackable)
    alone_pool = AdapterPool([(runs[1], "cells")])
    assert alone_pool.merged and not stacked.merged
    same([d.to_dict() for d in alone_pool.tag(["cells"] * 4, TEXTS)], alone(runs[1], TEXTS))
    served = [d.to_dict() for d in stacked.tag(["cells"] * 4, TEXTS)]
    same([d.to_dict() for d in alone_pool.tag(["cells"] * 4, TEXTS)], served)
    with pytest.raises(ValueError, match=r"genes: cannot be stacked with other adapters \(test: as if .*DoRA\)"):
        AdapterPool([(r, r.name) for r in runs])
    with pytest.raises(ValueError, match="cannot be stacked"):
        AdapterPool([(runs[1], "cells")], dynamic=True)
    with pytest.raises(ValueError, match="merged into its base"):
        alone_pool.add("genes", runs[0])


def test_serves_a_top_layers_run_with_trained_biases_and_its_own_decoding(runs, tiny_bert, tmp_path):
    """The study's kind of run (LoRA and biases on the top layer only, constrained decoding) served beside a
    plain one: each answers as it does alone, decoded as its run chose."""
    cfg = _cfg(tiny_bert, bias="all", lr=0.03, epochs=3)
    cfg = replace(cfg, lora=replace(cfg.lora, top_layers=1), train=replace(cfg.train, decode="constrained"))
    top = train(cfg, tmp_path / "top", progress=False)
    pool = AdapterPool([(runs[0], "genes"), (top, "top")])
    assert (pool.adapters["top"].decode, pool.adapters["top"].bias) == ("constrained", "all")
    assert pool.adapters["genes"].decode == "argmax"
    for name, run in (("genes", runs[0]), ("top", top)):
        same([d.to_dict() for d in pool.tag([name] * len(TEXTS), TEXTS)], alone(run, TEXTS))
    mixed = pool.tag(["top", "genes"] * 2, TEXTS[:4])
    same([d.to_dict() for d in mixed[::2]], alone(top, TEXTS[:4:2]))


def test_plain_peft_adapters_with_any_heads_and_dora_alone(tiny_bert, tmp_path):
    """Plain PEFT adapters (labels in a config.json beside them, LoRA on the embeddings too) stack with heads of
    different sizes, each answering as predict does for it. A DoRA adapter (not stackable, nor can PEFT run it in
    mixed batches) is served alone, merged; with others it is refused with the reason."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForTokenClassification

    def plain_adapter(name: str, names: list[str], seed: int, **kw) -> Path:
        torch.manual_seed(seed)
        id2label = dict(enumerate(names))
        base = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=len(names), id2label=id2label)
        targets = ["query", "value", "word_embeddings"]
        model = get_peft_model(
            base, LoraConfig(task_type=TaskType.TOKEN_CLS, r=4, lora_alpha=8, target_modules=targets, **kw)
        )
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname or "lora_embedding_B" in pname or "modules_to_save" in pname:
                    p.normal_(0, 0.5)
        model.save_pretrained(tmp_path / name)
        base.config.save_pretrained(tmp_path / name)  # the adapter's own labels (id2label) beside it
        return tmp_path / name

    def answers_as_predict(pool, paths):
        rows = [p.name for p in paths] * 2
        texts = [TEXTS[i % 3] for i in range(len(rows))]
        served = [d.to_dict() for d in pool.tag(rows, texts)]
        for path, text, doc in zip(paths * 2, texts, served):
            same([doc], [d.to_dict() for d in Tagger.load(path).tag_documents([text])])
        assert any(d["entities"] for d in served)  # random heads tag something: the comparison compares entities

    five = ["O", "B-DNA", "I-DNA", "B-protein", "I-protein"]
    paths = [plain_adapter("d1", five, 0), plain_adapter("d2", five, 1), plain_adapter("d3", five[:3], 2)]
    pool = AdapterPool([(p, p.name) for p in paths])
    assert not pool.merged and pool.model.stack.embed, "LoRA on the embeddings was not stacked"
    answers_as_predict(pool, paths)
    dora = plain_adapter("e1", five, 3, use_dora=True)
    pool = AdapterPool([(dora, dora.name)])
    assert pool.merged
    answers_as_predict(pool, [dora])
    with pytest.raises(ValueError, match=r"e1: cannot be stacked with other adapters \(adapter 'e1' uses DoRA\)"):
        AdapterPool([(dora, "e1"), (paths[0], "d1")])
