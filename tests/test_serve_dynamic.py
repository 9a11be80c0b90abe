"""Adapters that come and go while the server answers: add, replace, remove, --max-adapters, --watch, the admin
API, keys, per-adapter metrics, and the page following along."""

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loratag.serve.adapters import UnknownAdapter
from loratag.serve.pool import AdapterPool
from loratag.serve.settings import ServeSettings
from loratag.serve.watch import Watcher, complete_safetensors, fingerprint
from loratag.train import train

from .test_serve import TEXTS, _cfg, alone, running, same

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from loratag.serve.app import create_app  # noqa: E402

USER, ADMIN = "user-key-0123456789abcdef", "admin-key-0123456789abcdef"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    """Three 7-label runs that differ, and a 3-label one (DNA only)."""
    root = tmp_path_factory.mktemp("dyn")
    data = root / "dna-only"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.conll").write_text("IL-2\tB-DNA\ngene\tI-DNA\nbinds\tO\nDNA\tO\n")
    runs = {
        name: train(_cfg(tiny_bert, seed=s, lr=lr, epochs=e), root / name, progress=False)
        for s, lr, e, name in ((0, 0.05, 2, "a"), (1, 0.02, 40, "b"), (2, 0.03, 3, "c"))
    }
    runs["dna"] = train(_cfg(tiny_bert, data=data, lr=0.05, epochs=30), root / "dna", progress=False)
    return runs


@pytest.fixture(scope="module")
def expected(trained) -> dict[str, list[dict]]:
    return {name: alone(run, TEXTS) for name, run in trained.items()}


def _answers(pool, name: str) -> list[dict]:
    return [d.to_dict() for d in pool.tag([name] * len(TEXTS), TEXTS)]


def broken_copy(run: Path, dest: Path) -> Path:
    """A finished run whose classifier head does not match its labels (one label dropped from labels.json)."""
    import json

    shutil.copytree(run, dest)
    labels = json.loads((dest / "labels.json").read_text())
    labels = labels[:-1] if isinstance(labels, list) else dict(list(labels.items())[:-1])
    (dest / "labels.json").write_text(json.dumps(labels))
    return dest


def test_add_replace_remove_while_serving(trained, expected, tmp_path):
    pool = AdapterPool([(trained["a"], "a")], dynamic=True)
    events = []
    pool.listeners.append(lambda e, n, s: events.append((e, n)))
    pool.add("dna", trained["dna"])
    served = [d.to_dict() for d in pool.tag(["a", "dna"] * 2, TEXTS)]
    same(served[0::2], expected["a"][0::2])
    same(served[1::2], expected["dna"][1::2])
    pool.add("a", trained["b"])  # replaced: the name now answers with b's adapter
    same(_answers(pool, "a"), expected["b"])
    assert pool.remove("dna") and not pool.remove("dna")
    with pytest.raises(UnknownAdapter, match="unknown adapter 'dna'; known: a"):
        pool.tag(["dna"], ["IL-2"])
    with pytest.raises(ValueError, match="classifier head has 7 classes but the label set has 6"):
        pool.add("bad", broken_copy(trained["c"], tmp_path / "bad"))
    assert "bad" in pool.failed and "6" in pool.failed["bad"].error and list(pool.adapters) == ["a"]
    with pytest.raises(UnknownAdapter, match="'bad' is not served: it failed to load: .*6"):
        pool.tag(["bad"], ["IL-2"])
    same(_answers(pool, "a"), expected["b"])  # the failure disturbed nothing
    assert [e for e, _ in events].count("load") == 2 and ("fail", "bad") in events


def test_max_adapters_evicts_the_least_recently_used_and_keeps_pins(trained, expected):
    names = {f"n{i}": trained["abc"[i % 3]] for i in range(6)}
    pool = AdapterPool([(trained["a"], "pinned")], max_adapters=2, pins=("pinned",))
    for name, run in names.items():
        pool.add(name, run)
    assert len(pool.resident()) == 2 and "pinned" in pool.resident() and len(pool.adapters) == 7
    evicted = []
    pool.listeners.append(lambda e, n, s: evicted.append(n) if e == "evict" else None)
    for _ in range(2):
        for i, name in enumerate(names):  # every adapter in turn: cold loads, each answering as predict
            same(_answers(pool, name), expected["abc"[i % 3]])
            assert len(pool.resident()) <= 2 and "pinned" in pool.resident()
    assert "pinned" not in evicted and len(evicted) >= 10
    # a batch with more adapters than may be stacked is tagged a group at a time, in its own order
    rows = list(names) + ["pinned"]
    docs = [d.to_dict() for d in pool.tag(rows, [TEXTS[1]] * len(rows))]
    for i, doc in enumerate(docs[:-1]):
        same([doc], [expected["abc"[i % 3]][1]])
    assert len(pool.resident()) <= 3


def test_passes_in_progress_keep_their_adapters_while_others_come_and_go(trained, expected):
    pool = AdapterPool([(trained["a"], "a"), (trained["dna"], "dna")], dynamic=True)
    stop, errors = threading.Event(), []

    def churn():
        i = 0
        try:
            while not stop.is_set():
                pool.add("extra", trained["bc"[i % 2]])
                pool.remove("extra")
                pool.add("a", trained["a"])  # replaced by itself: the same answers throughout
                i += 1
        except Exception as e:  # pragma: no cover - reported by the assert below
            errors.append(e)
        errors.append(i)

    def client(k: int):
        outs = []
        for j in range(15):
            name = ("a", "dna")[(j + k) % 2]
            outs.append((name, [d.to_dict() for d in pool.tag([name] * 3, TEXTS[:3])]))
        return outs

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        with ThreadPoolExecutor(3) as ex:
            results = [r for rs in ex.map(client, range(3)) for r in rs]
    finally:
        stop.set()
        thread.join()
    assert len(errors) == 1 and errors[0] >= 1, errors  # churned at least once, and without an error
    for name, docs in results:
        same(docs, expected[name][:3])


def _copy_partial(run: Path, dest: Path) -> Path:
    """A run copied except the end of its adapter weights (a copy in progress)."""
    shutil.copytree(run, dest)
    weights = dest / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return weights


def test_watch_serves_complete_runs_replaces_changed_and_drops_removed(trained, expected, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(trained["a"], root / "a")
    pool = AdapterPool([(root / "a", "a")], dynamic=True)
    watch = Watcher(pool, root, served={"a": root / "a"})
    weights = _copy_partial(trained["b"], root / "b")
    assert not complete_safetensors(weights) and fingerprint(root / "b") is None
    watch.scan()
    watch.scan()
    assert list(pool.adapters) == ["a"], "a half-copied run was loaded"
    weights.write_bytes((trained["b"] / "adapter" / "adapter_model.safetensors").read_bytes())
    watch.scan()
    assert "b" not in pool.adapters  # seen once: waits for the copy to settle
    watch.scan()
    same(_answers(pool, "b"), expected["b"])
    shutil.copytree(trained["dna"], root / "dna")
    (root / "unfinished").mkdir()
    for name in ("config.json", "labels.json", "adapter"):  # training in progress: no metrics.json yet
        src = trained["c"] / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / "unfinished" / name)
    broken_copy(trained["c"], root / "broken")
    for _ in range(2):
        watch.scan()
    assert sorted(pool.adapters) == ["a", "b", "dna"] and list(pool.failed) == ["broken"]
    for name in ("a", "b", "dna"):
        same(_answers(pool, name), expected[name])
    shutil.rmtree(root / "a")
    shutil.copytree(trained["c"], root / "a")  # replaced in place (after a removal within one scan)
    watch.scan()
    watch.scan()
    same(_answers(pool, "a"), expected["c"])
    shutil.rmtree(root / "dna")
    watch.scan()
    assert "dna" in pool.adapters  # gone for one scan only: kept (a delete-then-move replacement)
    watch.scan()
    assert "dna" not in pool.adapters
    shutil.rmtree(root / "broken")
    watch.scan()
    watch.scan()
    assert not pool.failed


def test_watch_thread_picks_up_a_run_within_seconds(trained, expected, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    pool = AdapterPool([], base=str(_base_of(trained["a"])), dynamic=True)
    app, _ = create_app(pool, ServeSettings(wait_ms=1), watcher=Watcher(pool, root, interval=0.1))
    with TestClient(app) as c:
        assert c.get("/v1/adapters").json() == {"adapters": []}
        shutil.copytree(trained["dna"], root / "dna")
        start = time.monotonic()
        while time.monotonic() - start < 30 and "dna" not in pool.adapters:
            time.sleep(0.05)
        assert time.monotonic() - start < 5, "the new run took over 5 s to be served"
        r = c.post("/v1/tag", json={"adapter": "dna", "texts": TEXTS})
        same(r.json()["results"], expected["dna"])


def _base_of(run: Path) -> Path:
    from loratag.serve.adapters import base_of

    return Path(base_of(run))


@pytest.fixture(scope="module")
def keyed(trained, tmp_path_factory):
    """A real uvicorn server with user and admin keys, the admin API open under one folder."""
    root = tmp_path_factory.mktemp("allowed")
    shutil.copytree(trained["dna"], root / "dna")
    pool = AdapterPool([(trained["a"], "a")], dynamic=True)
    app, _ = create_app(pool, ServeSettings(wait_ms=2), user_keys=[USER], admin_keys=[ADMIN], allow_roots=[root])
    with running(app) as url:
        yield url, root, pool


def _auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_keys_through_uvicorn(keyed, trained, expected, tmp_path):
    url, root, pool = keyed
    body = {"adapter": "a", "texts": TEXTS}
    assert httpx.post(f"{url}/v1/tag", json=body).status_code == 401
    r = httpx.post(f"{url}/v1/tag", json=body, headers=_auth("wrong-key-0123456789abcdef"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert USER not in r.text and ADMIN not in r.text
    r = httpx.post(f"{url}/v1/tag", json=body, headers=_auth(USER))
    assert r.status_code == 200
    same(r.json()["results"], expected["a"])
    assert httpx.get(f"{url}/v1/adapters", headers=_auth(ADMIN)).status_code == 200  # the admin key may use too
    assert httpx.get(f"{url}/v1/adapters").status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200
    add = {"name": "dna", "path": str(root / "dna")}
    assert httpx.post(f"{url}/v1/adapters", json=add).status_code == 401
    r = httpx.post(f"{url}/v1/adapters", json=add, headers=_auth(USER))
    assert r.status_code == 403 and "admin key" in r.json()["detail"]
    assert httpx.delete(f"{url}/v1/adapters/a", headers=_auth(USER)).status_code == 403
    r = httpx.post(f"{url}/v1/adapters", json=add, headers=_auth(ADMIN))
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "dna" and r.json()["labels"] == ["O", "B-DNA", "I-DNA"]
    r = httpx.post(f"{url}/v1/tag", json={"adapter": "dna", "texts": TEXTS}, headers=_auth(USER))
    same(r.json()["results"], expected["dna"])
    # outside --allow-root, directly or through a link: 403, nothing loaded
    outside = {"name": "out", "path": str(trained["b"])}
    assert httpx.post(f"{url}/v1/adapters", json=outside, headers=_auth(ADMIN)).status_code == 403
    (root / "link").symlink_to(trained["b"])
    linked = {"name": "out", "path": str(root / "link")}
    assert httpx.post(f"{url}/v1/adapters", json=linked, headers=_auth(ADMIN)).status_code == 403
    dotdot = {"name": "out", "path": str(root / ".." / trained["b"].parent.name / "b")}
    assert httpx.post(f"{url}/v1/adapters", json=dotdot, headers=_auth(ADMIN)).status_code == 403
    missing = {"name": "out", "path": str(root / "nothing")}
    assert httpx.post(f"{url}/v1/adapters", json=missing, headers=_auth(ADMIN)).status_code == 404
    broken_copy(trained["c"], root / "broken")
    r = httpx.post(f"{url}/v1/adapters", json={"name": "broken", "path": str(root / "broken")}, headers=_auth(ADMIN))
    assert r.status_code == 422 and "6" in r.json()["detail"]
    listed = {a["name"]: a for a in httpx.get(f"{url}/v1/adapters", headers=_auth(USER)).json()["adapters"]}
    assert listed["broken"]["status"] == "failed" and "label set has 6" in listed["broken"]["error"]
    assert "out" not in listed and listed["dna"]["status"] == "ready"
    assert httpx.delete(f"{url}/v1/adapters/dna", headers=_auth(ADMIN)).status_code == 204
    r = httpx.post(f"{url}/v1/tag", json={"adapter": "dna", "text": "IL-2"}, headers=_auth(USER))
    assert r.status_code == 404
    assert httpx.delete(f"{url}/v1/adapters/dna", headers=_auth(ADMIN)).status_code == 404
    metrics = httpx.get(f"{url}/metrics").text
    assert 'loratag_adapter_requests_total{adapter="a",status="200"} 1.0' in metrics
    assert 'loratag_adapter_requests_total{adapter="dna",status="404"} 1.0' in metrics
    assert 'loratag_adapter_words_total{adapter="dna"}' in metrics
    assert "loratag_adapter_load_seconds_count" in metrics and "loratag_adapter_load_failures_total 1.0" in metrics
    assert 'loratag_errors_total{status="401"}' in metrics and 'loratag_errors_total{status="403"}' in metrics


def test_admin_api_is_off_without_allow_root(trained):
    pool = AdapterPool([(trained["a"], "a")])
    app, _ = create_app(pool)
    with TestClient(app) as c:
        r = c.post("/v1/adapters", json={"name": "b", "path": str(trained["b"])})
        assert r.status_code == 403 and "--allow-root" in r.json()["detail"]
        assert c.delete("/v1/adapters/a").status_code == 403
        assert c.post("/v1/tag", json={"adapter": "a", "text": "IL-2"}).status_code == 200  # no key set: open


def test_keys_from_environment_and_files(tmp_path, monkeypatch):
    from loratag.serve.cli import load_keys

    monkeypatch.setenv("LORATAG_API_KEY", USER)
    assert load_keys("LORATAG_API_KEY", None) == [USER]
    f = tmp_path / "keys"
    f.write_text(f"# rotated monthly\n{ADMIN}\n\nsecond-key-0123456789abcdef\n")
    assert load_keys("LORATAG_API_KEY", f) == [USER, ADMIN, "second-key-0123456789abcdef"]
    monkeypatch.setenv("LORATAG_API_KEY", "short")
    with pytest.raises(ValueError, match=r"\$LORATAG_API_KEY: a key must be at least 16 characters"):
        load_keys("LORATAG_API_KEY", None)
    monkeypatch.delenv("LORATAG_API_KEY")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no key in the file"):
        load_keys("LORATAG_API_KEY", tmp_path / "empty")


def test_page_lists_adapters_as_they_come_and_go(trained, keyed):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    url, root, pool = keyed
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#key", USER)
        page.dispatch_event("#key", "change")
        page.wait_for_selector("#adapter option[value=a]", state="attached")
        pool.add("late", trained["dna"])
        page.wait_for_selector("#adapters li[data-name=late]", timeout=10_000)
        page.wait_for_selector("#adapter option[value=late]", state="attached", timeout=10_000)
        listed = page.inner_text("#adapters li[data-name=late]")
        pool.remove("late")
        page.wait_for_selector("#adapter option[value=late]", state="detached", timeout=10_000)
        browser.close()
    assert "ready: DNA" in listed


def test_a_removed_adapter_answers_the_requests_it_accepted_first(trained, expected, monkeypatch):
    pool = AdapterPool([(trained["a"], "a"), (trained["dna"], "dna")], dynamic=True)
    entered, release = threading.Event(), threading.Event()
    real = pool.tag

    def held(adapters, texts):
        if "a" in adapters:
            entered.set()
            release.wait(60)
        return real(adapters, texts)

    monkeypatch.setattr(pool, "tag", held)
    app, _ = create_app(pool, ServeSettings(wait_ms=0, workers=2))
    with TestClient(app) as c, ThreadPoolExecutor(2) as ex:
        first = ex.submit(c.post, "/v1/tag", json={"adapter": "a", "texts": TEXTS})
        assert entered.wait(60)
        removing = ex.submit(pool.remove, "a")
        deadline = time.monotonic() + 30
        while "a" not in pool._inflight.draining and time.monotonic() < deadline:
            time.sleep(0.01)
        later = c.post("/v1/tag", json={"adapter": "a", "text": "IL-2"})
        assert later.status_code == 404 and not removing.done()  # refused; the accepted one still waits
        assert c.post("/v1/tag", json={"adapter": "dna", "texts": TEXTS}).status_code == 200  # others go on
        release.set()
        assert first.result().status_code == 200 and removing.result() is True
    same(first.result().json()["results"], expected["a"])
    assert "a" not in pool.adapters
