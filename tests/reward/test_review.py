"""Adversarial review of the reward (issue 9): farming, robustness, concurrency, thresholds.

Same fixtures as test_score.py (tests/reward/helpers.py): core "Ann likes tea.", S1 "Ann likes
green tea.", E2 "Ann went to Paris in 2022."; QA (1) "Which city did Ann visit in 2022?" -> Paris,
(2) "What did Ann name her new bike?" -> Rocket; extractive answerer + rule judge, BM25 only unless
said, token counter = whitespace pieces.
"""

import json
import threading

import numpy as np
import pytest

from membuilder.answering import ExtractiveAnswerer, build_answer_context
from membuilder.bank import MemoryBank
from membuilder.datasets import Question
from membuilder.embedders import HashingEmbedder
from membuilder.judging import RuleJudge
from membuilder.operations import Add
from membuilder.store import InMemoryStore
from reward import RewardConfig, RewardInputError, make_reward_fn, score_session
from reward.score import BaseCache

from .helpers import BIKE, RIDE, ops, outputs, put_state, request, words

ANSWER, JUDGE = ExtractiveAnswerer(), RuleJudge()


def score(store, reqs, config=None, *, token_counter=words, embedder=None, cache=None):
    return score_session(reqs, snapshots=store, token_counter=token_counter, answerer=ANSWER, judge=JUDGE,
                         config=config or RewardConfig(), embedder=embedder, cache=cache or BaseCache())


def by(reward):
    return {(s.index, s.agent): s for s in reward.samples}


@pytest.fixture
def snap(tmp_path):
    return put_state(tmp_path)


# --- farming the offline answerer + judge ------------------------------------------------------------


def test_extractive_answer_is_one_40_word_piece_of_a_long_sentence():
    # one 100-word "sentence" (no full stop): f0 .. f99 with "Ann named her bike Rocket" at 60..64
    words_ = [f"f{i}" for i in range(100)]
    words_[60:65] = ["Ann", "named", "her", "bike", "Rocket"]
    bank = MemoryBank(InMemoryStore(), "u")
    bank.apply([Add("semantic", " ".join(words_))])
    q = Question("q", "What did Ann name her bike?", "Rocket", "single-session", (), None, False)
    ctx = build_answer_context(bank, q)
    # cut into pieces of 40 words: 0..39, 40..79, 80..99; content words {ann, name, bike} ("named"
    # is not "name"): the piece 40..79 holds ann and bike (2/3), the others none -> it is the answer
    assert ExtractiveAnswerer().answer(q, ctx) == " ".join(words_[40:80])
    assert ExtractiveAnswerer(max_answer_words=100).answer(q, ctx) == " ".join(words_)  # unbounded: whole
    with pytest.raises(ValueError, match="max_answer_words"):
        ExtractiveAnswerer(max_answer_words=0)


def test_a_one_sentence_dump_does_not_farm_the_task_reward(snap):
    store, sid = snap
    # every question word first, both gold answers last, 50 fillers between, no full stop: before the
    # answer bound the whole 59-word entry was the answer to both questions and held both golds (T = 1)
    farm = ops("Ann name new bike city visit 2022 " + " ".join(f"f{i}" for i in range(50)) + " Rocket Paris")
    [r] = score(store, [request(sid, [outputs(semantic=BIKE), outputs(semantic=farm)])])
    # pieces 0..39 and 40..58. Q1 {city, ann, visit, 2022}: piece 0..39 has all four (E2 has 2 of 4),
    # so it answers, without "Paris"; Q2 {ann, name, new, bike}: the same piece, without "Rocket" -> T = 0
    assert r.task_rewards == (1.0, 0.0)
    assert by(r)[1, "semantic"].reward == 0.0 and by(r)[0, "semantic"].reward == 1.0


# --- robustness: one bad sample never takes the call down -------------------------------------------


class NaNOn(HashingEmbedder):
    """The hashing embedder, but NaN for any text containing `needle`."""

    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def embed(self, texts):
        vecs = np.array(super().embed(texts), dtype=np.float32)
        vecs[[self.needle in t for t in texts]] = np.nan
        return vecs


def test_an_embedder_failing_on_one_candidate_masks_that_candidate_only(snap):
    store, sid = snap
    [r] = score(store, [request(sid, [outputs(semantic=BIKE), outputs()])], embedder=NaNOn("Rocket"))
    s = by(r)
    assert r.task_rewards == (None, 0.5)
    assert all(s[0, a].masked and s[0, a].reward is None for a in ("core", "episodic", "semantic", "procedural"))
    assert "could not be built: EmbeddingError" in s[0, "semantic"].mask_reason
    assert s[1, "core"].reward == 0.5 and not s[1, "core"].masked
    # a question whose embedding fails: retrieval fails for every candidate -> all masked, no raise
    [r2] = score(store, [request(sid, [outputs()])], embedder=NaNOn("name her new bike"))
    assert r2.task_rewards == (None,)
    assert "retrieval for the candidate failed" in r2.samples[0].mask_reason


def test_a_token_counter_that_fails_masks_the_valid_sample_and_never_guesses(snap):
    store, sid = snap

    def strict(text):  # a Rust tokenizer refuses lone surrogates the same way
        text.encode("utf-8")
        return words(text)

    prose = BIKE + " thanks \ud800"  # valid JSON, a lone surrogate in the prose after it
    bad_memory = '{"operations": [{"action": "ADD", "memory": "Ann \ud800"}]}'
    [r] = score(store, [request(sid, [outputs(semantic=prose), outputs(semantic=bad_memory)])], token_counter=strict)
    s = by(r)
    assert s[0, "semantic"].valid and s[0, "semantic"].masked and s[0, "semantic"].reward is None
    assert s[0, "semantic"].mask_reason.startswith("token_counter failed on this output: UnicodeEncodeError")
    assert s[0, "core"].reward == 1.0  # its no-op core needs no count; T = 1 stands
    # an invalid sample is 0 whatever its length: not masked
    assert not s[1, "semantic"].valid and s[1, "semantic"].reward == 0.0 and not s[1, "semantic"].masked
    assert "not valid Unicode" in s[1, "semantic"].invalid_reason
    # a counter returning NaN gave a full penalty before (abs(nan - 0) < 200 is False): now masked
    [r] = score(store, [request(sid, [outputs(semantic=BIKE)])], token_counter=lambda t: float("nan"))
    assert by(r)[0, "semantic"].masked and "not a count" in by(r)[0, "semantic"].mask_reason


BAD_LENGTH = r"expert_tokens\['semantic'\] must be an integer"


@pytest.mark.parametrize("mutate, message", [
    (lambda r: {"outputs": ({"semantic": 123},)}, r"outputs\[0\]\['semantic'\] must be a string"),
    (lambda r: {"outputs": ({"semantic": ["x"]},)}, r"outputs\[0\]\['semantic'\] must be a string"),
    (lambda r: {"outputs": ("text",)}, r"outputs\[0\] must map agents"),
    (lambda r: {"expert_tokens": {**r.expert_tokens, "semantic": -3}}, BAD_LENGTH),
    (lambda r: {"expert_tokens": {**r.expert_tokens, "semantic": 2.5}}, BAD_LENGTH),
    (lambda r: {"expert_tokens": {**r.expert_tokens, "semantic": True}}, BAD_LENGTH),
    (lambda r: {"qa": ({"question": "q", "answer": "a"},)}, r"qa\[0\] is a dict, not a QAPair"),
])
def test_wrong_types_in_a_library_request_are_clear_errors(snap, mutate, message):
    from dataclasses import replace
    store, sid = snap
    req = request(sid, [outputs()])
    with pytest.raises(RewardInputError, match=message):
        score(store, [replace(req, **mutate(req))])


@pytest.mark.parametrize("raw, reason", [
    ('{"operations": ' + "[" * 50_000 + "]" * 50_000 + "}", "maximum recursion"),
    ('{"operations": [{"action": "ADD", "memory": "Ann \\ud800"}]}', "not valid Unicode"),
    ('{"operations": [{"action": "APPEND", "content": "x"}]}', "action 'APPEND' is no"),
    ('{"operations": [{"action": "UPDATE", "id": "E2", "new_memory": "x"}]}', "is episodic memory, not semantic"),
    ("<think>" + BIKE + "</think>", "nothing but a think-block"),
])
def test_hostile_outputs_are_invalid_with_a_reason(snap, raw, reason):
    store, sid = snap
    [r] = score(store, [request(sid, [outputs(semantic=raw)])])
    s = by(r)[0, "semantic"]
    assert not s.valid and s.reward == 0.0 and not s.masked and reason in s.invalid_reason
    assert by(r)[0, "core"].reward == 0.5  # the other agents' work still counts: T = 1/2


# --- attribution inside the reward -----------------------------------------------------------------


def test_attribution_counts_updates_and_breaks_ties_in_the_configured_order(snap):
    store, sid = snap
    update = json.dumps({"operations": [{"action": "UPDATE", "id": "S1",
                                         "new_memory": "Ann likes green tea and named her new bike Rocket."}]})
    cands = [outputs(semantic=update), outputs(episodic=RIDE, semantic=BIKE)]
    [r] = score(store, [request(sid, cands)])
    s = by(r)
    # three or four entries, top_k 10: every entry is retrieved for both questions. Candidate 0
    # changed S1 (a pre-session entry): it counts, twice; E2 is untouched and never counts
    assert s[0, "core"].retrieval_counts == {"episodic": 0, "semantic": 2, "procedural": 0}
    assert s[0, "semantic"].weight == 4.0 and s[0, "core"].weight == 1.0
    # candidate 1: its episodic RIDE and semantic BIKE, each retrieved twice: 2 = 2, episodic first
    assert s[1, "core"].retrieval_counts == {"episodic": 2, "semantic": 2, "procedural": 0}
    assert s[1, "episodic"].weight == 4.0 and s[1, "semantic"].weight == 1.0
    flipped = RewardConfig(tie_order=("semantic", "episodic", "procedural"))
    [r] = score(store, [request(sid, cands[1:])], flipped)
    assert by(r)[0, "semantic"].weight == 4.0 and by(r)[0, "episodic"].weight == 1.0
    assert by(r)[0, "core"].weight == 1.0  # core: never boosted


# --- the length penalties inside the reward, at the thresholds ---------------------------------------


def test_core_growth_thresholds_and_a_rewrite_to_empty_in_the_reward(snap):
    store, sid = snap

    def replace_growing(n):  # "tea." -> "tea. w w ... w": the block grows by exactly n tokens
        return json.dumps({"action": "REPLACE", "old_text": "tea.", "new_text": "tea. " + " ".join(["w"] * n)})

    cands = [outputs(core=replace_growing(150), semantic=BIKE), outputs(core=replace_growing(151), semantic=BIKE),
             outputs(core=replace_growing(400), semantic=BIKE),
             outputs(core=json.dumps({"action": "REWRITE", "content": ""}), semantic=BIKE)]
    [r] = score(store, [request(sid, cands)])
    s = by(r)
    assert r.task_rewards == (1.0, 1.0, 1.0, 1.0)
    assert s[0, "core"].length_penalty == 0.0 and s[0, "core"].reward == 1.0  # 150 = theta_min: free
    assert s[1, "core"].length_penalty == pytest.approx(1 / 250)  # (151 - 150) / (400 - 150)
    assert s[1, "core"].reward == pytest.approx(1 - 0.8 / 250)  # 0.9968
    assert s[2, "core"].length_penalty == 1.0 and s[2, "core"].reward == pytest.approx(0.2)
    # emptying the block is a valid shrink: free; its loss shows only through T
    assert s[3, "core"].valid and s[3, "core"].length_penalty == 0.0 and s[3, "core"].reward == 1.0


def test_ratio_thresholds_in_the_reward(snap):
    store, sid = snap
    fill = lambda n: ops("Ann named her new bike Rocket.", " ".join(["w"] * (n - 13)))  # noqa: E731
    assert words(fill(100)) == 100  # 13 JSON / text pieces around the fillers
    expert = {"core": 0, "episodic": 0, "semantic": 1000, "procedural": 0}
    cands = [outputs(semantic=fill(n)) for n in (1300, 1301, 1650, 499, 350)]
    [r] = score(store, [request(sid, cands, expert_tokens=expert)])
    got = [by(r)[g, "semantic"].length_penalty for g in range(5)]
    # r = 1.3 (band edge), 1.301, 1.65, 0.499, 0.35
    assert got == pytest.approx([0.0, 0.001 / 0.7, 0.35 / 0.7, 0.001 / 0.3, 0.15 / 0.3])
    assert by(r)[2, "semantic"].reward == pytest.approx(1 - 0.8 * 0.5)
    # expert 100: 299 tokens differ by 199 (free although r = 2.99), 300 by 200 (r = 3: full)
    [r] = score(store, [request(sid, [outputs(semantic=fill(299)), outputs(semantic=fill(300))],
                                expert_tokens={**expert, "semantic": 100})])
    assert [by(r)[g, "semantic"].length_penalty for g in (0, 1)] == [0.0, 1.0]


# --- concurrency ---------------------------------------------------------------------------------------


def test_8_threads_on_shared_snapshots_give_the_serial_results(tmp_path):
    store, sid = put_state(tmp_path, extra=30)
    _, sid2 = put_state(tmp_path, owner="conv-2", extra=5)
    emb = HashingEmbedder()
    cands = [outputs(semantic=BIKE), outputs(episodic=RIDE), outputs(), outputs(episodic="junk", semantic=BIKE)]
    batches = [[request(sid, cands[i % 4:] + cands[:i % 4], session_id=f"s{i}"),
                request(sid2, cands[::-1], owner="conv-2", session_id=f"t{i}")] for i in range(8)]

    def plain(results):
        return [{**r.to_dict(), "elapsed_s": 0} for r in results]

    serial = [plain(score(store, b, embedder=emb)) for b in batches]
    shared = BaseCache()  # cold: the 8 threads race to build the same two bases
    fn = make_reward_fn(snapshots=store, token_counter=words, answerer=ANSWER, judge=JUDGE, embedder=emb,
                        config=RewardConfig(workers=3))
    start = threading.Barrier(8)
    got, errors = {}, []

    def worker(i):
        try:
            start.wait()
            direct = plain(score(store, batches[i], embedder=emb, cache=shared))
            via_fn = plain(fn(batches[i]))
            got[i] = (direct, via_fn)
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [got[i] for i in range(8)] == [(serial[i], serial[i]) for i in range(8)]
    assert len(shared._bases) == 2 and len(fn.cache._bases) == 2  # each base built once and shared


def test_think_block_and_prose_around_the_json_are_valid_but_paid_for_in_length(snap):
    store, sid = snap
    raw = "<think>" + " ".join(["t"] * 300) + "</think>Sure, here it is:\n```json\n" + BIKE + "\n```"
    # pieces: "<think>t", 298 x "t", "t</think>Sure,", "here", "it", "is:", "```json", BIKE's 10, "```"
    assert words(raw) == 1 + 298 + 1 + 3 + 1 + 10 + 1 == 315
    expert = {"core": 0, "episodic": 0, "semantic": 10, "procedural": 0}
    [r] = score(store, [request(sid, [outputs(semantic=raw), outputs(semantic=BIKE)], expert_tokens=expert)])
    s = by(r)
    assert r.task_rewards == (1.0, 1.0)  # the fenced JSON after the think-block is the answer
    # 315 vs 10 tokens: they differ by 305 >= 200 and r = 31.5 > 2 -> l = 1, R = 1 * (1 - 0.8)
    assert s[0, "semantic"].valid and s[0, "semantic"].length_penalty == 1.0
    assert s[0, "semantic"].reward == pytest.approx(0.2) and s[1, "semantic"].reward == 1.0
