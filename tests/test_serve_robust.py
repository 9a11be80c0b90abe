"""Serving adapters with trained biases beside plain ones, requests that fail alone, and limits clients can read."""

import asyncio
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from loratag.serve.adapters import split_biases
from loratag.serve.batcher import Batcher
from loratag.serve.pool import AdapterPool
from loratag.serve.settings import ServeSettings
from loratag.tagger import Tagger
from loratag.train import train

from .conftest import RESOURCES, guide_adapter
from .test_serve import TEXTS, _cfg, running, same

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from loratag.serve.app import create_app  # noqa: E402

LABELS = RESOURCES / "tiny/label.json"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_bert) -> list[tuple[Path, str]]:
    """Adapters of every bias kind on one base: loratag runs (none, all, lora_only) and a guide-style adapter."""
    root = tmp_path_factory.mktemp("mixed")
    runs = [
        (train(_cfg(tiny_bert, bias=b, seed=s, lr=0.05, epochs=3), root / name, progress=False), name)
        for b, s, name in (("none", 0, "plain"), ("all", 1, "biased"), ("lora_only", 2, "lora-biased"))
    ]
    return [*runs, (guide_adapter(tiny_bert, root / "guide", seed=5), "guide")]


@pytest.fixture(scope="module")
def mixed_pool(mixed) -> AdapterPool:
    from loratag.labels import LabelSet

    return AdapterPool(mixed, labels=LabelSet.load(LABELS))


def _alone(path: Path, texts):
    """What `loratag predict` answers for the adapter alone (merged, its own biases written into its base)."""
    from loratag.labels import LabelSet

    return [d.to_dict() for d in Tagger.load(path, labels=LabelSet.load(LABELS)).tag_documents(texts)]


def test_every_bias_kind_serves_on_one_base_and_answers_as_predict(mixed, mixed_pool):
    assert not mixed_pool.merged
    assert {a.name: a.bias for a in mixed_pool.adapters.values()} == {
        "plain": "none",
        "biased": "all",
        "lora-biased": "lora_only",
        "guide": "all",
    }
    expected = {name: _alone(path, TEXTS) for path, name in mixed}
    # one mixed batch: every text with every adapter, interleaved
    adapters = [name for _ in TEXTS for _, name in mixed]
    texts = [t for t in TEXTS for _ in mixed]
    docs = [d.to_dict() for d in mixed_pool.tag(adapters, texts)]
    for (name, text), doc in zip(zip(adapters, texts), docs):
        same([doc], [expected[name][TEXTS.index(text)]])
    # and the adapters really differ (biases included), so the check is not vacuous
    logits = {
        name: mixed_pool.tagger.word_logits([["IL-2", "binds", "NF-kappa", "B"]], adapters=[name])[0]
        for _, name in mixed
    }
    assert all(not torch.allclose(logits["plain"], logits[n], atol=1e-3) for n in ("biased", "lora-biased", "guide"))


def test_trained_biases_are_applied_per_row_and_the_base_is_untouched(mixed, mixed_pool, tiny_bert):
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification

    guide = next(p for p, n in mixed if n == "guide")
    _, biases, head = split_biases(load_file(guide / "adapter_model.safetensors"))
    assert any("LayerNorm" in m for m in biases) and any("attention.self.key" in m for m in biases)
    assert sorted(head) == ["classifier.bias", "classifier.weight"] and head["classifier.weight"].shape[0] == 7
    fresh = dict(AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=7).named_parameters())
    shared = dict(mixed_pool.tagger.model.model.named_parameters())
    for name, p in shared.items():  # the shared base's own biases are the base model's, whatever the adapters
        key = name.replace(".base.", ".")
        if name.endswith("bias") and key in fresh:
            assert torch.equal(p, fresh[key]), name


def test_mixed_concurrent_http_requests_of_every_bias_kind(mixed, mixed_pool):
    app, _ = create_app(mixed_pool, ServeSettings(wait_ms=20, workers=2))
    expected = {(name, i): _alone(path, [t])[0] for path, name in mixed for i, t in enumerate(TEXTS)}
    jobs = [(name, i) for _ in range(2) for _, name in mixed for i in range(len(TEXTS))]
    with TestClient(app) as c:

        def call(job):
            name, i = job
            return job, c.post("/v1/tag", json={"adapter": name, "text": TEXTS[i]})

        with ThreadPoolExecutor(16) as ex:
            results = list(ex.map(call, jobs))
        listed = {a["name"]: a["bias"] for a in c.get("/v1/adapters").json()["adapters"]}
    assert listed["guide"] == "all" and listed["plain"] == "none"
    for job, r in results:
        assert r.status_code == 200, r.text
        same(r.json()["results"], [expected[job]])


def test_an_unservable_adapter_is_refused_naming_the_run_and_why(mixed, monkeypatch):
    from loratag.serve import multilora

    def unstackable(*a, **k):
        raise multilora.Unstackable("an adapter uses DoRA")

    monkeypatch.setattr(multilora, "weights_of", unstackable)
    with pytest.raises(ValueError, match=r"plain: cannot be stacked with other adapters \(an adapter uses DoRA\)"):
        AdapterPool(mixed[:2])


def test_a_plain_adapter_without_labels_is_refused_naming_labels(mixed):
    with pytest.raises(ValueError, match=r"guide: the adapter does not say its label order .*pass it with --labels"):
        AdapterPool([mixed[3]])


# ---- requests that fail alone ----


def _bad_body() -> bytes:
    """Valid JSON that the schema's str type accepts: a lone surrogate, which no tokenizer can take."""
    return json.dumps({"adapter": "plain", "text": "IL-2 \ud800 binds"}).encode()  # ensure_ascii: \\ud800


@pytest.fixture(scope="module")
def server(mixed_pool):
    app, inner = create_app(mixed_pool, ServeSettings(wait_ms=20, workers=2, max_words=300))
    with running(app) as url:
        yield url
    assert not inner.state.batcher.threads, "the worker threads did not stop with the app"


def test_32_concurrent_requests_one_bad_text_only_it_fails(server, mixed):
    path = next(p for p, n in mixed if n == "plain")
    texts = [TEXTS[i % 3] for i in range(32)]
    expected = {t: _alone(path, [t])[0] for t in set(texts)}

    def call(i):
        if i == 17:
            return i, httpx.post(f"{server}/v1/tag", content=_bad_body(), headers={"content-type": "application/json"})
        return i, httpx.post(f"{server}/v1/tag", json={"adapter": "plain", "text": texts[i]}, timeout=60)

    with ThreadPoolExecutor(32) as ex:
        results = dict(ex.map(call, range(32)))
    bad = results.pop(17)
    assert bad.status_code == 422, bad.text
    detail = bad.json()["detail"][0]
    assert detail["loc"] == ["body", "text"] and "surrogate" in detail["msg"]
    assert [r.status_code for r in results.values()] == [200] * 31
    for i, r in results.items():
        same(r.json()["results"], [expected[texts[i]]])


def test_a_bad_text_in_texts_is_named_by_index(server):
    body = json.dumps({"adapter": "plain", "texts": ["fine", "IL-2 \udc00"]}).encode()
    r = httpx.post(f"{server}/v1/tag", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "text 1" in r.text


def test_a_failing_batch_is_retried_one_by_one():
    """Whatever makes a batch fail (here: one text), only its own request fails; the others get answers."""
    seen = []

    def tag(adapters, texts):
        seen.append(len(texts))
        if "BOOM" in texts:
            raise RuntimeError("tokenizer says no")
        return [f"{a}:{t}" for a, t in zip(adapters, texts)]

    batcher = Batcher(tag, wait_ms=50, workers=1)

    async def main():
        jobs = [batcher.submit("a", ["BOOM" if i == 3 else f"t{i}"]) for i in range(8)]
        return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(main())
    batcher.close()
    assert isinstance(results[3], RuntimeError)
    assert [r for i, r in enumerate(results) if i != 3] == [[f"a:t{i}"] for i in range(8) if i != 3]
    assert max(seen) > 1, "the requests were never batched together; the retry was not exercised"
    assert not batcher.threads


def test_workers_survive_cancelled_requests():
    """A client that goes away cancels its future; answering it used to kill the worker thread."""
    gate = threading.Event()

    def tag(adapters, texts):
        gate.wait(5)
        return list(texts)

    batcher = Batcher(tag, wait_ms=1, workers=1)

    async def main():
        first = asyncio.ensure_future(batcher.submit("a", ["x"]))
        await asyncio.sleep(0.1)
        first.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.wait_for(batcher.submit("a", ["y"]), 10)

    assert asyncio.run(main()) == ["y"]
    assert all(t.is_alive() for t in batcher.threads)
    batcher.close()
    assert not batcher.threads


# ---- limits clients can read ----


def test_a_10_mb_body_from_urllib_reads_413(server):
    req = urllib.request.Request(
        f"{server}/v1/tag", data=b"x" * (10 << 20), headers={"content-type": "application/json"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413 and b"request body over" in e.value.read()


def test_a_chunked_body_over_the_limit_gets_413(server):
    def chunks():
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB, no Content-Length: Transfer-Encoding chunked

    r = httpx.post(f"{server}/v1/tag", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "request body over" in r.text


def test_too_many_words_gets_413_naming_the_limit(server):
    r = httpx.post(f"{server}/v1/tag", json={"adapter": "plain", "text": "( " * 400}, timeout=60)
    assert r.status_code == 413 and "--max-words" in r.text and "400 words" in r.text
    r = httpx.post(f"{server}/v1/tag", json={"adapter": "plain", "text": "( " * 100}, timeout=60)
    assert r.status_code == 200


def test_a_small_chunked_body_still_works(server):
    body = json.dumps({"adapter": "plain", "text": TEXTS[0]}).encode()
    r = httpx.post(
        f"{server}/v1/tag", content=iter([body[:10], body[10:]]), headers={"content-type": "application/json"}
    )
    assert r.status_code == 200 and r.json()["adapter"] == "plain"


def test_serve_settings_defaults_live_in_one_place_and_are_checked():
    from loratag.cli import build_parser

    args = build_parser().parse_args(["serve", "x"])
    assert {k[6:]: v for k, v in vars(args).items() if k.startswith("serve.")} == {
        f: getattr(ServeSettings(), f)
        for f in ("wait_ms", "max_batch_texts", "max_queue", "max_body_bytes", "drain_body_bytes")
        + ("max_text_chars", "max_texts", "max_words")
    }
    with pytest.raises(ValueError, match="--max-words must be >= 1"):
        ServeSettings(max_words=0)
    assert ServeSettings(wait_ms=0).wait_ms == 0
