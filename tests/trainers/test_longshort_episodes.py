"""The long/short-term episode source: groups, rewards and masks with a scripted engine, the
configured source, per-role metrics, one step of the unchanged ADRPO trainer on it, and (slow)
that the trainer raises a tiny SFT-started model's task reward on it."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from membuilder.bank import MemoryBank
from membuilder.datasets import Message, Session
from membuilder.embedders import HashingEmbedder
from membuilder.judging import RuleJudge
from membuilder.longshort import OfflineAnswerAgent
from membuilder.longshort.builder import LONG_TERM_KIND
from membuilder.operations import Add
from membuilder.store import InMemoryStore
from reward.config import RewardConfig
from reward.types import QAPair
from rollout.types import Completion, SamplingParams
from trainers.longshort_episodes import Chunk, LongShortEpisodes, world_chunks
from trainers.rl_batch import MaskReason, assign_advantages, batch_counts, counts_to_metrics

EMB = HashingEmbedder()
AUSTIN = "Dalia lives in Austin."
PIXEL = "Noor has a parrot named Pixel."


class ScriptedEngine:
    """Answers call k with `calls[k]`: per prompt, its n texts (checked against what is asked)."""

    def __init__(self, calls, *, finish="stop", tokenizer=None):
        self.calls = list(calls)
        self.prompts = []
        self.finish = finish
        self.tokenizer = tokenizer  # given: real token ids (the trainer computes log-probs on them)
        self.pushes = 0

    def generate(self, prompts, params):
        k = len(self.prompts)
        self.prompts.append(prompts)
        script = self.calls[k]
        assert len(script) == len(prompts) and all(len(s) == params.n for s in script), (k, len(prompts), params.n)
        return [[self._completion(p, t) for t in texts] for p, texts in zip(prompts, script)]

    def _completion(self, prompt, text):
        tok = self.tokenizer
        if tok is None:
            ids = tuple(range(1, len(text.split()) + 1))  # one token per word: 0 words -> empty
            return Completion((7, 8, 9), ids, (0.0,) * len(ids), text, self.finish)
        prompt_ids = tok(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)["input_ids"]
        ids = tuple(tok(text, add_special_tokens=False)["input_ids"]) + (tok.eos_token_id,)
        return Completion(tuple(prompt_ids), ids, (-1.0,) * len(ids), text, self.finish)

    def update_weights(self, named_tensors, version=None):
        self.pushes += 1

    def sleep(self, level=1):
        pass

    def wake_up(self):
        pass

    def close(self):
        pass


def _chunk(qa=True, key="c0/s1") -> Chunk:
    bank = MemoryBank(InMemoryStore(), "c0", embedder=EMB)
    bank.apply([Add(LONG_TERM_KIND, PIXEL, "2022-01-01")], session_id="s0")
    session = Session("s1", datetime(2022, 1, 3), "3 January 2022", (
        Message("Dalia", "user", "I moved to Austin last month.", "s1:0"),
        Message("Noor", "assistant", "Pixel says hi!", "s1:1"),
    ))
    pairs = (QAPair("What is the name of Noor's parrot?", "Pixel"), QAPair("Where does Dalia live?", "Austin"))
    return Chunk(key, session, bank.snapshot(), pairs if qa else (), {"splitter": "x" * 50})


def _split(important, unimportant=()):
    return json.dumps({"important": list(important), "unimportant": list(unimportant)})


def _decisions(*actions):
    return json.dumps({"decisions": [dict(fact=i, action=a, **({"memory": m} if m else {}))
                                     for i, (a, m) in enumerate(actions)]})


def _source(chunks, **kw):
    return LongShortEpisodes(chunks, answerer=OfflineAnswerAgent(), judge=RuleJudge(), embedder=EMB, **kw)


# Four splitter samples of one chunk (G = 4), then the follow-up prompts in (g, role) order.
SPLITS = [
    _split([AUSTIN]),  # g0: the new fact
    _split([AUSTIN, PIXEL]),  # g1: plus one memory already holds -> its decision is NOOP
    "The facts are about a parrot.",  # g2: not JSON: invalid, no follow-up
    _split([AUSTIN], ["Dalia had coffee."]),  # g3: its long-term answer will be invalid
]
FOLLOW = [
    [_decisions(("ADD", AUSTIN))],  # g0 long_term
    [_decisions(("ADD", AUSTIN), ("NOOP", None))],  # g1 long_term
    ["{}"],  # g3 long_term: no decisions -> invalid
    [json.dumps({"state": "Dalia had coffee."})],  # g3 short_term
]


def _collect(source, engine, G=4, indices=(0,), max_tokens=64):
    return source.collect(list(indices), engine, SamplingParams(n=G, max_tokens=max_tokens, seed=3), step=1)


def test_groups_rewards_and_the_noop_penalty_of_the_splitter():
    engine = ScriptedEngine([[SPLITS], FOLLOW])
    ep = _collect(_source([_chunk()], noop_weight=0.5), engine)
    # One splitter prompt with n = 4, then the four follow-up prompts in one call with n = 1.
    assert len(engine.prompts[0]) == 1 and len(engine.prompts[1]) == 4
    g1_long_term = engine.prompts[1][1][1]["content"]
    assert f"Fact 1: {PIXEL}" in g1_long_term and PIXEL in g1_long_term.split("Fact 1:")[1]  # shown what it holds
    got = [(s.group, s.agent, s.index, s.valid, s.reward, s.task_reward) for s in ep.samples]
    # T: both questions right when Austin is added (Pixel was stored before); an invalid split or an
    # invalid long-term answer adds nothing, so only the parrot question is right: T = 1/2.
    # Splitter R = v * (T - 0.5 * noops / m): g0 1 - 0 = 1; g1 1 - 0.5 * 1/2 = 0.75; g2 invalid 0;
    # g3 0.5 - 0 = 0.5 (its split is valid, the long-term agent failed).
    assert got == [
        (0, "splitter", 0, True, 1.0, 1.0), (0, "splitter", 1, True, 0.75, 1.0),
        (0, "splitter", 2, False, 0.0, 0.5), (0, "splitter", 3, True, 0.5, 0.5),
        (1, "long_term", 0, True, 1.0, 1.0), (1, "long_term", 1, True, 1.0, 1.0),
        (1, "long_term", 3, False, 0.0, 0.5),
        (2, "short_term", 3, True, 0.5, 0.5),
    ]
    assert ep.group_size == 4 and all(s.mask is None for s in ep.samples)
    assert ep.counts == {"chunks": 1.0, "follow_prompts": 4.0, "consolidations": 0.0, "candidates_answered": 4.0}
    groups = assign_advantages(ep.samples, ep.group_size)
    # splitter [1, .75, 0, .5]: mean .5625, unbiased var (.4375^2+.1875^2+.5625^2+.0625^2)/3 = .182292
    adv = [s.advantage for s in ep.samples]
    std = 0.182292**0.5
    assert adv[:4] == pytest.approx([0.4375 / std, 0.1875 / std, -0.5625 / std, -0.0625 / std], rel=1e-4)
    # long_term [1, 1, 0]: mean 2/3, var (1/9 + 1/9 + 4/9) / 2 = 1/3; short_term: one sample, no signal.
    assert adv[4:7] == pytest.approx([(1 / 3) / 3**-0.5, (1 / 3) / 3**-0.5, -(2 / 3) / 3**-0.5], rel=1e-4)
    assert adv[7] == 0.0 and groups == {"groups": 3, "zero_variance": 0, "no_signal": 1}


def test_consolidation_is_its_own_group_with_the_short_term_reward():
    long_state = "Dalia had coffee. " * 4  # 72 characters, over a limit of 40
    splits = [_split([], ["Dalia had coffee."])] * 2
    engine = ScriptedEngine([
        [splits],
        [[json.dumps({"state": long_state})], [json.dumps({"state": long_state})]],
        [[json.dumps({"state": "Dalia had coffee."})], ["no json"]],  # g0 fits, g1 fails
    ])
    ep = _collect(_source([_chunk()], state_limit=40), engine, G=2)
    assert "over the limit of 40" in engine.prompts[2][0][0]["content"]
    got = [(s.group, s.agent, s.index, s.valid, s.reward) for s in ep.samples]
    # No new long-term fact: only the parrot question is right, T = 1/2 for both candidates.
    assert got == [
        (0, "splitter", 0, True, 0.5), (0, "splitter", 1, True, 0.5),
        (1, "short_term", 0, True, 0.5), (1, "short_term", 1, False, 0.0),
        (2, "consolidation", 0, True, 0.5), (2, "consolidation", 1, False, 0.0),
    ]
    assert ep.counts["consolidations"] == 2.0


def test_a_failing_answerer_masks_the_valid_samples_and_keeps_invalid_ones_at_zero():
    class Down:
        name = "down"

        def answer(self, question, context):
            raise ConnectionError("answerer down")

    engine = ScriptedEngine([[SPLITS], FOLLOW])
    source = LongShortEpisodes([_chunk()], answerer=Down(), judge=RuleJudge(), embedder=EMB)
    ep = _collect(source, engine)
    masked = [(s.agent, s.index) for s in ep.samples if s.mask is MaskReason.REWARD_MASKED]
    # Every candidate's T is unknown: valid samples are masked, the invalid ones keep R = 0.
    assert masked == [("splitter", 0), ("splitter", 1), ("splitter", 3), ("long_term", 0), ("long_term", 1),
                      ("short_term", 3)]
    assert all("answerer down" in s.mask_detail for s in ep.samples if s.mask is not None)
    assert [(s.agent, s.index, s.reward) for s in ep.samples if s.mask is None] == [
        ("splitter", 2, 0.0), ("long_term", 3, 0.0)]
    assert ep.counts["candidates_answered"] == 0.0


def test_no_qa_empty_and_truncated_samples_are_masked():
    engine = ScriptedEngine([[SPLITS], FOLLOW])
    ep = _collect(_source([_chunk(qa=False)]), engine)
    assert {s.mask for s in ep.samples} == {MaskReason.NO_QA} and all(s.reward is None for s in ep.samples)

    splits = [_split([AUSTIN]), ""]  # g1: empty completion (invalid: reward 0, not trained on)
    engine = ScriptedEngine([[splits], [[_decisions(("ADD", AUSTIN))]]], finish="length")
    ep = _collect(_source([_chunk()], mask_truncated=True), engine, G=2)
    assert [(s.agent, s.index, s.mask, s.reward) for s in ep.samples] == [
        ("splitter", 0, MaskReason.TRUNCATED, 1.0), ("splitter", 1, MaskReason.EMPTY, 0.0),
        ("long_term", 0, MaskReason.TRUNCATED, 1.0)]


def test_length_penalty_against_the_expert_answer():
    # Tokens = characters here; the expert's split has 50. A split of r = 2x the expert's length
    # with gamma_u 1.3, upper 2.0: l = min(1, (2 - 1.3) / 0.7) = 1, R = T * (1 - 0.8 * 1) = 0.2 T.
    text = _split([AUSTIN])
    pad = 100 - len(text)
    split = text[:-1] + " " * pad + "}"
    assert len(split) == 100
    engine = ScriptedEngine([[[split, split]], [[_decisions(("ADD", AUSTIN))]] * 2])
    cfg = RewardConfig(lam=0.8, min_diff=0)
    ep = _collect(_source([_chunk()], count_tokens=len, reward_config=cfg), engine, G=2)
    splitter = [s for s in ep.samples if s.agent == "splitter"]
    assert [(s.length_penalty, s.reward) for s in splitter] == [(1.0, pytest.approx(0.2))] * 2
    # The long-term role has no expert answer in this chunk: no penalty.
    assert all(s.length_penalty == 0.0 for s in ep.samples if s.agent == "long_term")


def test_per_role_metrics_keep_the_memory_agent_keys_and_refuse_unregistered_roles():
    engine = ScriptedEngine([[SPLITS], FOLLOW])
    ep = _collect(_source([_chunk()]), engine)
    counts = batch_counts(ep.samples, assign_advantages(ep.samples, 4)).values
    # Fixed key set: the four memory agents and the registered long/short-term roles, scored or not.
    for role in ("core", "episodic", "semantic", "procedural", "splitter", "long_term", "short_term", "consolidation"):
        assert f"scored_{role}" in counts
    assert set(counts) == set(batch_counts([], {}).values)
    m = counts_to_metrics(counts)
    assert m["reward/splitter/mean"] == pytest.approx((1 + 0.75 + 0 + 0.5) / 4)
    assert m["reward/long_term/valid_rate"] == pytest.approx(2 / 3)
    assert "reward/consolidation/mean" not in m and "reward/core/mean" not in m
    assert m["reward/valid_rate"] == pytest.approx(6 / 8)
    ep.samples[0].agent = "critic"
    with pytest.raises(ValueError, match="critic"):
        batch_counts(ep.samples, {})
    with pytest.raises(ValueError, match="critic"):
        batch_counts(ep.samples, {}, roles=("splitter",))


def test_world_chunks_start_from_the_expert_state_and_carry_their_qa():
    chunks = world_chunks(0, 1, 2, embedder=EMB)
    assert [c.key.rsplit("-", 1)[1] for c in chunks] == ["s1", "s2"] and all(c.qa for c in chunks)
    assert chunks[0].state.entries == ()  # nothing stored before the first session
    # The second chunk starts from the first one's four long-term facts, added by the expert.
    assert len(chunks[1].state.entries) == len(json.loads(chunks[0].expert_outputs["splitter"])["important"]) == 4
    assert set(chunks[0].expert_outputs) == {"splitter", "long_term"}  # no unimportant facts: no short-term turn


@pytest.mark.slow  # builds a tiny tokenizer and model: 2-10 s on the shared machine
def test_the_config_selects_the_longshort_source(tmp_path):
    from trainers.adrpo_config import ADRPOConfig
    from trainers.config import ConfigError, load_config
    from trainers.episodes import SourceContext, configured_source
    from trainers.tiny import save_tiny_policy

    base = save_tiny_policy(tmp_path / "model")
    cfg = load_config(ADRPOConfig, overrides=["data.architecture=longshort", "data.world_conversations=1",
                                              "data.world_sessions=2", "model.path=null"])
    source = configured_source(SourceContext(cfg, tmp_path, base, None, True))
    assert isinstance(source, LongShortEpisodes) and len(source) == 2
    assert source.count_tokens("Dalia lives in Austin.") > 0 and source.reward_config.lam == cfg.reward.length_lambda
    cfg = load_config(ADRPOConfig, overrides=["data.architecture=longshort", "data.path=rl.parquet"])
    with pytest.raises(ConfigError, match="data.path"):
        configured_source(SourceContext(cfg, tmp_path, base, None, True))


@pytest.mark.slow  # builds a tiny tokenizer and model: 2-10 s on the shared machine
def test_one_step_of_the_unchanged_adrpo_trainer_on_the_source(tmp_path):
    from transformers import AutoTokenizer

    from tests.trainers.adrpo_helpers import tiny_config
    from trainers.adrpo import ADRPOTrainer
    from trainers.tiny import save_tiny_policy

    base = save_tiny_policy(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(base)
    engine = ScriptedEngine([[SPLITS], FOLLOW], tokenizer=tok)
    cfg = tiny_config(base, tmp_path / "run", "data.sessions_per_step=1", "rollout.group_size=4", "train.max_steps=1",
                      "loss.beta=0", "checkpoint.every_steps=0")
    trainer = ADRPOTrainer(cfg, engine=engine, episodes=_source([_chunk()]))
    try:
        (m,) = trainer.train().metrics
    finally:
        trainer.close()
    # The step's metrics are the source's samples with the hand-computed rewards of
    # test_groups_rewards_and_the_noop_penalty_of_the_splitter: 8 samples in 3 groups, all trained.
    assert m["batch/samples"] == 8 and m["batch/trained_samples"] == 8 and m["batch/groups"] == 3
    assert m["batch/no_signal_groups"] == 1 and m["batch/zero_variance_groups"] == 0
    assert m["reward/splitter/mean"] == pytest.approx(2.25 / 4) and m["reward/long_term/mean"] == pytest.approx(2 / 3)
    assert m["reward/short_term/mean"] == pytest.approx(0.5) and m["reward/valid_rate"] == pytest.approx(6 / 8)
    assert m["episodes/chunks"] == 1 and m["episodes/follow_prompts"] == 4
    # A real update on the 8 completions' tokens (each ends with its end-of-turn token).
    assert m["train/loss_sequences"] == 8 and m["train/grad_norm"] > 0 and engine.pushes == 2


class RoleEngine:
    """Splitter prompts get `splits` (cycled over calls); follow-up prompts a valid answer by role."""

    def __init__(self, splits):
        self.splits = splits

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            system = p[0]["content"]
            if "fact splitter" in system:
                texts = [self.splits[(len(out) * params.n + j) % len(self.splits)] for j in range(params.n)]
            elif "long-term memory agent" in system:
                facts = p[1]["content"].count("\nFact ") + p[1]["content"].startswith("Fact ")
                texts = [_decisions(*[("ADD", f"Fact number {i}.") for i in range(facts)])]
            else:
                texts = [json.dumps({"state": "Dalia had coffee."})]
            out.append([ScriptedEngine([])._completion(p, t) for t in texts])
        return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(SPLITS + [_split([], ["Dalia had coffee."]), _split([])]), min_size=2, max_size=5),
       st.integers(2, 5), st.booleans())
def test_groups_are_dense_consecutive_one_role_each_and_follow_the_splits(splits, G, two_chunks):
    chunks = [_chunk(key="c0/s1")] + ([_chunk(key="c0/s1b")] if two_chunks else [])
    ep = _source(chunks).collect(list(range(len(chunks))), RoleEngine(splits), SamplingParams(n=G, seed=0), step=1)
    seen = []
    for s in ep.samples:
        key = (s.group, s.session, s.agent)
        if not seen or seen[-1][0] != key:
            seen.append((key, []))
        seen[-1][1].append(s.index)
    groups = [k for k, _ in seen]
    # Group ids 0, 1, ... each appearing in one consecutive run, of one chunk and one role.
    assert [g for g, _, _ in groups] == list(range(len(groups)))
    for (g, session, agent), indices in seen:
        assert indices == sorted(set(indices)) and all(0 <= i < G for i in indices)
        if agent == "splitter":
            assert indices == list(range(G))
    for i, chunk in enumerate(chunks):
        split_texts = [s.completion.text for s in ep.samples if s.session == chunk.key and s.agent == "splitter"]
        for role, wants in (("long_term", "important"), ("short_term", "unimportant")):
            # A role's sample exists for g exactly when g's split parses and lists facts for it.
            expect = [g for g, t in enumerate(split_texts) if t.startswith("{") and json.loads(t)[wants]]
            got = [s.index for s in ep.samples if s.session == chunk.key and s.agent == role]
            assert got == expect
    assert all(s.reward is not None for s in ep.samples)  # the chunks have QA and nothing failed


def _sft(model, rows, steps: int, lr: float) -> None:
    """Full-batch AdamW on the target tokens (mean NLL over all targets of all rows)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    n = sum(len(t) for _, t in rows)
    for _ in range(steps):
        opt.zero_grad()
        for prompt, target in rows:
            logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
            (torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum") / n).backward()
        opt.step()


@torch.no_grad()
def _sequence_logp(model, prompt, target) -> float:
    logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
    return -torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()


@pytest.mark.slow  # ~40-60 s on one core: a 60-step SFT, 30 ADRPO steps, two 128-sample evaluations
def test_the_unchanged_trainer_raises_the_task_reward_on_the_longshort_source(tmp_path):
    """What makes the signal learnable for a 0.9M-parameter model: a short SFT (tokenizer trained
    on the chunk's prompts, so prompts are ~300 tokens) teaches the long-term answer for the expert
    split to near-certainty and leaves the splitter as an even mixture of two well-formed answers
    that part at one token: list the new fact (then the long-term agent ADDs it and both questions
    are right, T = 1) or list nothing (valid, nothing new stored, T = 1/2). Each group then holds
    both branches, the shared prefix cancels in the group-relative advantages, the rest of each
    answer has probability ~1 (gradient ~0), so the update acts on the branch token. A model that
    had to learn the JSON itself loses it under any step large enough to matter in a few dozen
    steps (benchmarks/results/longshort.md, "Trained by ADRPO")."""
    from tests.trainers.adrpo_helpers import tiny_config
    from trainers.adrpo import ADRPOTrainer
    from trainers.tiny import build_tiny_policy
    from membuilder.longshort.reward import rollout_prompts

    chunk = _chunk()
    source = _source([chunk])
    expert, lazy = _split([AUSTIN]), _split([])
    long_term = rollout_prompts(chunk.state, chunk.session, expert, embedder=EMB)["long_term"]
    pairs = [(source.splitter_prompt(chunk), expert), (source.splitter_prompt(chunk), lazy),
             (long_term, _decisions(("ADD", AUSTIN)))]
    model, tok = build_tiny_policy(seed=0, vocab_size=1024,
                                   texts=[m["content"] for p, _ in pairs for m in p] * 2 + [t for _, t in pairs] * 2)

    def encode(messages):
        return tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"]

    rows = [(encode(p), tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for p, t in pairs]
    torch.manual_seed(0)
    _sft(model, rows, steps=60, lr=3e-3)
    model.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")

    cfg = tiny_config(tmp_path / "sft", tmp_path / "run", "data.sessions_per_step=1", "rollout.group_size=8",
                      "rollout.max_tokens=48", "rollout.temperature=1.0", "rollout.top_p=1.0", "train.max_steps=30",
                      "optim.lr=1e-4", "loss.beta=0", "checkpoint.every_steps=0")
    trainer = ADRPOTrainer(cfg, episodes=source)

    def task_reward() -> float:
        """Mean T over 128 splitter samples (same seed before and after training)."""
        ep = source.collect([0], trainer.engine, SamplingParams(n=128, temperature=1.0, max_tokens=48, seed=123), step=0)
        return sum(s.task_reward for s in ep.samples if s.agent == "splitter") / 128

    try:
        before = task_reward()
        p_before = [_sequence_logp(trainer.unwrapped_model, *rows[i]) for i in (0, 1)]
        result = trainer.train()
        after = task_reward()  # the engine holds the trained weights (pushed after every step)
        p_after = [_sequence_logp(trainer.unwrapped_model, *rows[i]) for i in (0, 1)]
    finally:
        trainer.close()
    assert len(result.metrics) == 30
    # The policy moved toward the rewarded branch: p(expert split) up, p(empty split) down ...
    assert p_after[0] > p_before[0] + 0.2 and p_after[1] < p_before[1] - 0.5, (p_before, p_after)
    # ... and the task reward its samples earn rose (T in {1/2, 1} per sample; 128 samples each).
    assert after > before + 0.05, (before, after)
