"""Embedders: deterministic hashing, the real MiniLM loaded offline, the OpenAI-compatible
client against a local fake server, and the LRU cache."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from membuilder.embedders import (
    CachedEmbedder,
    Embedder,
    EmbeddingError,
    HashingEmbedder,
    OpenAIEmbedder,
    SentenceTransformerEmbedder,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)  # rows are unit vectors


# ---- hashing ------------------------------------------------------------------------------


def test_hashing_pinned_vector():
    # ngram=0 keeps three features: w:hello (1.0), w:world (1.0), "b:hello world" (0.5).
    # blake2b-64 (little endian) of each: mod 16 -> buckets 9, 13, 6; top bits 0, 0, 1 -> signs
    # +, +, -. Norm sqrt(1 + 1 + 0.25) = 1.5 -> +2/3 at 9 and 13, -1/3 at 6.
    vec = HashingEmbedder(dim=16, ngram=0).embed(["Hello, WORLD!"])[0]
    expected = np.zeros(16, dtype=np.float32)
    expected[[9, 13, 6]] = [2 / 3, 2 / 3, -1 / 3]
    np.testing.assert_allclose(vec, expected, atol=1e-7)
    for feature, bucket, sign in [("w:hello", 9, 0), ("w:world", 13, 0), ("b:hello world", 6, 1)]:
        h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        assert (h % 16, h >> 63) == (bucket, sign)


def test_hashing_char_ngrams_match_an_independent_computation():
    # "Hi" -> w:hi (1.0) and char trigrams of "<hi>": "<hi", "hi>" (0.25 each); no bigram.
    vec = HashingEmbedder(dim=64).embed(["Hi"])[0]
    ref = np.zeros(64)
    for feature, weight in [("w:hi", 1.0), ("c:<hi", 0.25), ("c:hi>", 0.25)]:
        h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        ref[h % 64] += -weight if h >> 63 else weight
    np.testing.assert_allclose(vec, ref / np.linalg.norm(ref), atol=1e-7)


def test_hashing_is_identical_across_instances_and_processes():
    texts = ["Caroline went to the LGBTQ support group on 7 May 2023.", "ünïcode wörds"]
    a = HashingEmbedder().embed(texts)
    b = HashingEmbedder().embed(texts)
    assert a.dtype == np.float32 and a.shape == (2, 384)
    np.testing.assert_array_equal(a, b)
    code = (
        "import sys, numpy as np; from membuilder.embedders import HashingEmbedder; "
        f"sys.stdout.write(HashingEmbedder().embed({texts!r}).tobytes().hex())"
    )
    for seed in ("1", "12345"):  # str hashing differs per seed; ours must not
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=REPO)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout
        assert out == a.tobytes().hex()


def test_hashing_normalised_blank_and_shapes():
    emb = HashingEmbedder(dim=32)
    assert isinstance(emb, Embedder) and emb.name == "hashing-v1:dim=32:ngram=3"
    vecs = emb.embed(["one two three", "", "   ", "x"])
    norms = np.linalg.norm(vecs, axis=1)
    np.testing.assert_allclose(norms, [1, 0, 0, 1], atol=1e-6)  # blank text -> zero vector
    assert emb.embed([]).shape == (0, 32)
    with pytest.raises(TypeError, match="single str"):
        emb.embed("one text")
    with pytest.raises(ValueError, match="dim"):
        HashingEmbedder(dim=0)


def test_hashing_related_texts_are_closer_than_unrelated():
    a, b, c = HashingEmbedder().embed([
        "I went travelling to Paris last summer with my sister",
        "She travels to Paris every summer",
        "The recipe needs two eggs, flour and butter",
    ])
    assert _cos(a, b) > 0.2 > abs(_cos(a, c))


# ---- sentence-transformers ----------------------------------------------------------------


@pytest.mark.slow
def test_minilm_loads_offline_and_ranks_paraphrases():
    emb = SentenceTransformerEmbedder()
    # Name and dimension come from the model folder's configs, without loading the model.
    assert emb.name == "sentence-transformers:all-MiniLM-L6-v2:dim=384" and emb.dim == 384
    assert emb._model is None
    vecs = emb.embed([
        "A man is eating food.",
        "Someone is having a meal.",
        "The stock market crashed today.",
        "",
    ])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert vecs.shape == (4, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), [1, 1, 1, 0], atol=1e-5)
    assert _cos(vecs[0], vecs[1]) > 0.5 > _cos(vecs[0], vecs[2])
    assert emb.embed([]).shape == (0, 384)


# ---- OpenAI-compatible endpoint -----------------------------------------------------------


def _fake_vector(text: str) -> list[float]:
    # Deterministic, text-dependent, deliberately not unit length.
    return [float(len(text)), float(text.count("a")) + 1.0, 2.0]


class _FakeEmbeddings(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        if self.path != "/v1/embeddings":
            return self._reply(404, {"error": {"message": "no such route"}})
        if body["model"] == "broken":
            return self._reply(500, {"error": {"message": "model exploded"}})
        inputs = body["input"]
        data = [
            {"object": "embedding", "index": i, "embedding": _fake_vector(t)}
            for i, t in enumerate(inputs)
        ]
        if body["model"] == "short":
            data = data[:-1]
        data.reverse()  # out of order on purpose: the client must follow `index`
        self._reply(200, {"object": "list", "data": data, "model": body["model"],
                          "usage": {"prompt_tokens": 1, "total_tokens": 1}})


@pytest.fixture()
def fake_server():
    _FakeEmbeddings.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeEmbeddings)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _FakeEmbeddings.requests
    server.shutdown()
    server.server_close()


def test_openai_embedder_batches_truncates_and_orders(fake_server):
    base_url, requests = fake_server
    emb = OpenAIEmbedder("fake-embed", base_url=base_url, api_key="k", batch_size=2,
                         max_chars=10, max_retries=0)
    assert emb.name == "openai:fake-embed:dim=native"
    texts = ["banana", "", "a much longer text than ten chars", "cat", "aa"]
    vecs = emb.embed(texts)
    # The blank text is not sent; 4 texts in batches of 2 -> 2 requests.
    assert [r["input"] for r in requests] == [["banana", "a much lon"], ["cat", "aa"]]
    assert all(r["encoding_format"] == "float" and r["model"] == "fake-embed" for r in requests)
    assert emb.dim == 3 and vecs.shape == (5, 3)
    sent = ["banana", None, "a much lon", "cat", "aa"]
    for row, text in zip(vecs, sent):
        if text is None:
            assert not row.any()
        else:
            ref = np.array(_fake_vector(text))
            np.testing.assert_allclose(row, ref / np.linalg.norm(ref), rtol=1e-6)
    assert emb.embed([]).shape == (0, 3)
    assert len(requests) == 2  # dim already known: no probe


def test_openai_embedder_errors_are_clear(fake_server):
    base_url, requests = fake_server
    broken = OpenAIEmbedder("broken", base_url=base_url, api_key="k", max_retries=0)
    with pytest.raises(EmbeddingError, match="HTTP 500"):
        broken.embed(["x"])
    short = OpenAIEmbedder("short", base_url=base_url, api_key="k", max_retries=0)
    with pytest.raises(EmbeddingError, match="returned 1 embeddings for 2 inputs"):
        short.embed(["x", "y"])
    fixed = OpenAIEmbedder("fake-embed", base_url=base_url, api_key="k", dimensions=5,
                           max_retries=0)
    with pytest.raises(EmbeddingError, match="dimension 3, expected 5"):
        fixed.embed(["x"])
    assert requests[-1]["dimensions"] == 5


def test_openai_embedder_config_from_env(monkeypatch, fake_server):
    base_url, requests = fake_server
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "MEMBUILDER_EMBED_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MEMBUILDER_EMBED_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="no API key"):
        OpenAIEmbedder("fake-embed")
    monkeypatch.setenv("MEMBUILDER_EMBED_BASE_URL", base_url)
    emb = OpenAIEmbedder("fake-embed", max_retries=0)  # local URL: no key needed
    assert emb.dim == 3  # learned from one probe request
    assert requests[0]["input"] == ["dimension probe"]


# ---- cache --------------------------------------------------------------------------------


class _Counting:
    """Wraps the hashing embedder and records what it is asked to embed."""

    def __init__(self):
        self.inner = HashingEmbedder(dim=24)
        self.name, self.dim = self.inner.name, self.inner.dim
        self.calls: list[list[str]] = []

    def embed(self, texts):
        self.calls.append(list(texts))
        return self.inner.embed(texts)


def test_cached_embedder_computes_only_misses():
    inner = _Counting()
    cache = CachedEmbedder(inner, max_entries=3)
    assert cache.name == inner.name and cache.dim == 24
    out = cache.embed(["a", "b", "a"])
    assert inner.calls == [["a", "b"]]  # one batched call, repeat de-duplicated
    assert (cache.hits, cache.misses) == (1, 2)
    np.testing.assert_array_equal(out, inner.inner.embed(["a", "b", "a"]))
    out[:] = 0  # the caller's array is a copy
    out = cache.embed(["b", "c", "a"])
    assert inner.calls[-1] == ["c"] and (cache.hits, cache.misses) == (3, 3)
    np.testing.assert_array_equal(out, inner.inner.embed(["b", "c", "a"]))
    # LRU: capacity 3 holds a, b, c with "b" least recently used; "d" evicts "b".
    cache.embed(["d"])
    assert len(cache) == 3 and len(inner.calls) == 3
    cache.embed(["a", "c", "d"])  # all cached
    assert len(inner.calls) == 3
    cache.embed(["b"])  # evicted, so computed again
    assert inner.calls[-1] == ["b"] and (cache.hits, cache.misses) == (6, 5)
    assert cache.embed([]).shape == (0, 24) and len(inner.calls) == 4


def test_cache_never_stores_a_nan_answer():
    """Issue 11 item 5: a NaN answer is an error, and a retry asks the model again."""
    from membuilder.embedders import EmbeddingError

    class FlakyNaN(HashingEmbedder):
        calls = 0

        def embed(self, texts):
            self.calls += 1
            out = super().embed(texts)
            return out * np.nan if self.calls == 1 else out

    inner = FlakyNaN(dim=8)
    cached = CachedEmbedder(inner)
    with pytest.raises(EmbeddingError, match="non-finite"):
        cached.embed(["tea"])
    assert len(cached) == 0
    np.testing.assert_array_equal(cached.embed(["tea"]), HashingEmbedder(dim=8).embed(["tea"]))
    assert inner.calls == 2
