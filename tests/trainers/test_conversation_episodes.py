"""The sparse ablation's conversation episodes: on-policy prompts, the final bank's task reward,
its dependence on earlier sessions, masks and counts, and one trainer step end to end.

A scripted engine answers each (conversation, session, trajectory g, agent) prompt with a text the
test chooses (by default the expert's own answer from the RL rows), so every reward is checked
against an independent computation on the tiny prepared world (2 conversations x 3 sessions).
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from membuilder.agents.apply import apply_agent_outputs
from membuilder.answering import ExtractiveAnswerer, build_answer_context
from membuilder.bank import MemoryBank
from membuilder.datasets import (
    CharacterMemory,
    Conversation,
    Event,
    LifeEvent,
    Message,
    Observation,
    Question,
    Relation,
    Session,
    SessionAnnotation,
)
from membuilder.embedders import HashingEmbedder
from membuilder.judging import RuleJudge
from membuilder.snapshots import SnapshotStore, state_digest
from membuilder.store import InMemoryStore
from reward.config import RewardConfig as LibraryRewardConfig
from reward.score import score_session
from reward.types import AGENTS, RewardComputationError, SessionRewardRequest
from rollout.types import Completion, SamplingParams
from trainers.adrpo_config import ADRPOConfig, RewardConfig
from trainers.config import ConfigError, load_config
from trainers.conversation_episodes import ConversationEpisodes, conversation_set
from trainers.data.conversations import (
    ConversationFileError,
    conversation_from_dict,
    conversation_to_dict,
    read_conversations,
    write_conversations,
)
from trainers.data.rl_rows import read_rl_rows
from trainers.data.trajectories import session_clock
from trainers.episodes import SourceContext, configured_source
from trainers.rl_batch import MaskReason

G = 2
EMPTY_OPS = '{"operations": []}'


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny policy folder and the world data prepared with its tokenizer (2 conversations x 3 sessions)."""
    from transformers import AutoTokenizer

    from trainers.engines import build_reward_parts
    from trainers.prepare_data import prepare_world
    from trainers.tiny import save_tiny_policy

    root = tmp_path_factory.mktemp("conv_episodes")
    base = save_tiny_policy(root / "model", seed=0)
    prepare_world(root / "data", conversations=2, sessions=3, tokenizer=str(base))
    rl_set = read_rl_rows(root / "data" / "rl.parquet")
    conv_file = read_conversations(root / "data" / "conversations.jsonl")
    parts = build_reward_parts(RewardConfig(), tokenizer=AutoTokenizer.from_pretrained(base))
    return {"base": base, "data": root / "data", "rl": rl_set, "file": conv_file, "parts": parts,
            "expert": {(r.conversation_id, r.session_index, r.agent): r.expert_output for r in rl_set.rows},
            "prompt": {(r.conversation_id, r.session_index, r.agent): list(r.prompt) for r in rl_set.rows}}


def _convs(world, rows=None):
    # split=None: both conversations (the 2-conversation world holds one out of training)
    return conversation_set(rows or world["rl"].rows, world["file"].by_id(), split=None)


def _source(world, convs=None, **kwargs) -> ConversationEpisodes:
    return ConversationEpisodes(convs or _convs(world), kwargs.pop("parts", world["parts"]),
                                SnapshotStore(world["rl"].snapshots_dir), render=world["file"].render, **kwargs)


class ScriptedEngine:
    """`generate` answering prompt i of call k with `script(conv, k, g, agent)` (None: the expert's answer).

    The source sends, per call, conversations in order, then g, then agents in `AGENTS` order."""

    def __init__(self, world, convs, script=lambda conv, k, g, agent: None, tokens=3, finish="stop"):
        self.world, self.convs, self.script = world, convs, script
        self.tokens, self.finish = tokens, finish
        self.calls: list[tuple[list, SamplingParams]] = []

    def generate(self, prompts, params):
        k = len(self.calls)
        self.calls.append((list(prompts), params))
        active = [c for c in self.convs if k < len(c.sessions)]
        out = []
        for i, _ in enumerate(prompts):
            conv, g, agent = active[i // (G * 4)], (i // 4) % G, AGENTS[i % 4]
            text = self.script(conv, k, g, agent)
            if text is None:
                text = self.world["expert"][(conv.key, conv.indices[k], agent)]
            n = self.tokens
            out.append([Completion((1, 2), tuple(range(10, 10 + n)), (0.0,) * n, text, self.finish)])
        return out

    def prompt(self, k, conv_key, g, agent):
        prompts, _ = self.calls[k]
        active = [c.key for c in self.convs if k < len(c.sessions)]
        return prompts[active.index(conv_key) * G * 4 + g * 4 + AGENTS.index(agent)]


def _params(seed=7):
    return SamplingParams(n=G, temperature=0.8, top_p=0.9, max_tokens=8, seed=seed)


def _by_trajectory(samples):
    out = {}
    for s in samples:
        out.setdefault((s.session.split("/")[0], s.index), []).append(s)
    return out


def _independent_task_reward(world, conv, outputs_of):
    """T from scratch: a plain MemoryBank fed the same answers session by session, then the
    offline answerer and rule judge over every QA pair of the conversation (its own retrieval)."""
    clock = {"now": 0.0}
    bank = MemoryBank(InMemoryStore(), conv.owner, embedder=HashingEmbedder(), clock=lambda: clock["now"])
    state = SnapshotStore(world["rl"].snapshots_dir).get(conv.initial_snapshot_id)
    bank.restore(replace(state, owner=conv.owner))
    for k, session in enumerate(conv.sessions):
        clock["now"] = session_clock(session, conv.indices[k])
        apply_agent_outputs(bank, outputs_of(k), session_id=session.session_id, drop_invalid_agents=True)
    last_date = conv.sessions[-1].date
    answerer, judge, correct = ExtractiveAnswerer(), RuleJudge(), 0
    for n, pair in enumerate(conv.qa):
        q = Question(question_id=pair.question_id or f"qa{n}", question=pair.question, answer=pair.answer,
                     category=pair.qtype, evidence=(),
                     question_date=datetime.fromisoformat(pair.question_date) if pair.question_date else None,
                     is_abstention=pair.qtype == "abstention", question_date_text=pair.question_date)
        ctx = build_answer_context(bank, q, k=10, current_date=last_date)
        correct += bool(judge.judge(q, answerer.answer(q, ctx)).correct)
    return correct / len(conv.qa)


# ---------------------------------------------------------------------------------------------
# (1) on-policy prompts
# ---------------------------------------------------------------------------------------------


def test_session_two_prompts_show_what_each_trajectory_wrote_in_session_one(world):
    convs = _convs(world)
    conv = next(c for c in convs if c.key == "world-0-001")
    written = json.loads(world["expert"][(conv.key, 0, "episodic")])["operations"][0]["memory"]
    # Trajectory 1 writes nothing episodic in session 1; trajectory 0 writes the expert's entry.
    script = lambda c, k, g, agent: EMPTY_OPS if (k, g, agent) == (0, 1, "episodic") else None  # noqa: E731
    engine = ScriptedEngine(world, convs, script)
    _source(world, convs).collect([0, 1], engine, _params(), step=1)

    assert [len(p) for p, _ in engine.calls] == [2 * G * 4] * 3  # one call per session: all convs x G x 4
    assert all(params.n == 1 for _, params in engine.calls)
    own = engine.prompt(1, conv.key, 0, "episodic")[1]["content"]
    other = engine.prompt(1, conv.key, 1, "episodic")[1]["content"]
    assert written in own and written not in other
    # Trajectory 0 followed the expert, so its every prompt is the RL row's, rendered from the
    # expert's state: the same renderer, settings, clock and bank semantics.
    for k in range(3):
        for c in convs:
            for agent in AGENTS:
                assert engine.prompt(k, c.key, 0, agent) == world["prompt"][(c.key, k, agent)]
    # Session 1 starts from one state for every g: identical prompts (the engine's seeding gives
    # them different samples); the calls' seeds are fixed by the step's seed and differ by session.
    assert engine.prompt(0, conv.key, 0, "core") == engine.prompt(0, conv.key, 1, "core")
    seeds = [params.seed for _, params in engine.calls]
    again = ScriptedEngine(world, convs, script)
    _source(world, convs).collect([0, 1], again, _params(), step=1)
    assert [p.seed for _, p in again.calls] == seeds and len(set(seeds)) == 3


# ---------------------------------------------------------------------------------------------
# (2) T_g is the final bank's answering; (3) earlier sessions count
# ---------------------------------------------------------------------------------------------


def test_final_task_reward_equals_an_independent_rebuild_and_answering(world):
    convs = _convs(world)

    def script(c, k, g, agent):  # trajectory 1 loses session 2's episodic entries
        return EMPTY_OPS if (g, k, agent) == (1, 1, "episodic") else None

    engine = ScriptedEngine(world, convs, script)
    episodes = _source(world, convs).collect([0, 1], engine, _params(), step=1)
    trajectories = _by_trajectory(episodes.samples)
    lam = world["parts"].config.lam
    for conv in convs:
        for g in range(G):
            samples = trajectories[(conv.key, g)]
            assert len(samples) == 3 * 4

            def outputs_of(k, g=g, conv=conv):
                return {a: script(conv, k, g, a) or world["expert"][(conv.key, conv.indices[k], a)] for a in AGENTS}

            expected = _independent_task_reward(world, conv, outputs_of)
            assert {s.task_reward for s in samples} == {expected}, (conv.key, g)
            for s in samples:  # R = v * T * (1 - lambda * l), every expert-like answer valid
                assert s.valid and s.mask is None
                assert s.reward == pytest.approx(expected * (1 - lam * s.length_penalty), abs=1e-12)
    # The expert's memory answers some, not all, questions; losing entries costs trajectory 1.
    t = {key: ss[0].task_reward for key, ss in trajectories.items()}
    assert all(0 < v < 1 for v in t.values())
    assert episodes.counts["validity_mismatch"] == 0


def test_an_earlier_sessions_output_changes_the_reward(world):
    """Two trajectories that differ only in session 1's semantic answer get different T (the fault
    of the library's session-level approximation, where they get the same T, is absent)."""
    convs = _convs(world)
    conv = next(c for c in convs if c.key == "world-0-001")
    pair = next(q for q in conv.qa if q.question == "Where did Zoe grow up?")  # the world's seed fixes it
    # The expert keeps this fact in the core block only, which the offline answerer does not read.
    fact = json.dumps({"operations": [{"action": "ADD", "memory": f"Zoe grew up in {pair.answer}."}]})

    def script(c, k, g, agent):
        return fact if (c.key, k, g, agent) == (conv.key, 0, 1, "semantic") else None

    episodes = _source(world, [conv]).collect([0], ScriptedEngine(world, [conv], script), _params(), step=1)
    t = {g: ss[0].task_reward for (_, g), ss in _by_trajectory(episodes.samples).items()}
    assert t[1] > t[0]  # the fact answers its question (and the extractive answerer gains elsewhere too)
    assert t[1] == _independent_task_reward(
        world, conv, lambda k: {a: script(conv, k, 1, a) or world["expert"][(conv.key, k, a)] for a in AGENTS})
    sem = [s for s in episodes.samples if s.session.endswith("-s1") and s.agent == "semantic"]
    assert [s.valid for s in sem] == [True, True] and sem[0].reward != sem[1].reward

    # The library's sparse mode over the expert's states: the same answers give one T for both.
    requests = []
    for k, rows in enumerate(conv.rows):
        outs = [{a: script(conv, k, g, a) or world["expert"][(conv.key, k, a)] for a in AGENTS} for g in range(G)]
        requests.append(SessionRewardRequest(
            owner=conv.owner, snapshot_id=rows.first.snapshot_id, session_id=rows.first.session_id, qa=rows.first.qa,
            expert_tokens={r.agent: r.expert_tokens for r in rows.rows}, outputs=tuple(outs),
            session_date=rows.first.session_date))
    p = world["parts"]
    approx = score_session(requests, snapshots=SnapshotStore(world["rl"].snapshots_dir), token_counter=p.token_counter,
                           answerer=p.answerer, judge=p.judge, config=LibraryRewardConfig(dense=False),
                           embedder=p.embedder)
    assert approx[0].task_rewards[0] == approx[0].task_rewards[1] == t[0]


def test_attribution_counts_what_the_trajectory_wrote_in_every_session(world):
    """The dominant kind of the final answering counts entries written in earlier sessions too."""
    convs = _convs(world)
    conv = next(c for c in convs if c.key == "world-0-001")
    # Only session 1 writes episodic entries (the expert's); sessions 2 and 3 write nothing searchable.
    script = lambda c, k, g, agent: EMPTY_OPS if k > 0 and agent != "core" else None  # noqa: E731
    episodes = _source(world, [conv]).collect([0], ScriptedEngine(world, [conv], script), _params(), step=1)
    last = [s for s in episodes.samples if s.session.endswith("-s3")]
    assert {s.dominant_kind for s in last} == {"episodic"}
    assert {s.weight for s in last if s.agent == "episodic"} == {world["parts"].config.alpha}
    assert {s.weight for s in last if s.agent != "episodic"} == {1.0}


# ---------------------------------------------------------------------------------------------
# (4) masks and counts
# ---------------------------------------------------------------------------------------------


def test_a_conversation_without_qa_is_masked_and_never_scored(world):
    rows = [replace(r, qa=()) if r.conversation_id == "world-0-000" else r for r in world["rl"].rows]
    convs = _convs(world, rows)
    seen = []

    def scorer(requests, prior_own_ids):
        seen.extend(requests)
        return score_session(requests, snapshots=source._store, token_counter=world["parts"].token_counter,
                             answerer=world["parts"].answerer, judge=world["parts"].judge, config=source.config,
                             embedder=world["parts"].embedder, prior_own_ids=prior_own_ids)

    source = _source(world, convs, scorer=scorer)
    episodes = source.collect([0, 1], ScriptedEngine(world, convs), _params(), step=1)
    masked = [s for s in episodes.samples if s.session.startswith("world-0-000/")]
    scored = [s for s in episodes.samples if s.session.startswith("world-0-001/")]
    assert len(masked) == len(scored) == 3 * 4 * G
    assert {(s.mask, s.reward) for s in masked} == {(MaskReason.NO_QA, None)}
    assert all(s.mask is None and s.reward is not None for s in scored)
    assert {r.owner for r in seen} == {"world-0-001"} and len(seen) == 3 * G  # 3 sessions, G calls
    # counts: 2 conversations of 3 sessions, G trajectories each, one without QA
    c = episodes.counts
    assert (c["conversations"], c["sessions"], c["trajectories"], c["conversations_without_qa"]) == (2, 6, 4, 1)
    assert set(episodes.times) == {"rollout", "memory", "reward"}


def test_a_reward_failure_masks_that_trajectorys_samples_and_others_are_scored(world):
    convs = _convs(world)
    calls = []

    def scorer(requests, prior_own_ids):
        calls.append(len(requests))
        if len(calls) == 2:  # the call of trajectory g = 1 (one call per g)
            raise RewardComputationError("judge unavailable (test)")
        return score_session(requests, snapshots=source._store, token_counter=world["parts"].token_counter,
                             answerer=world["parts"].answerer, judge=world["parts"].judge, config=source.config,
                             embedder=world["parts"].embedder, prior_own_ids=prior_own_ids)

    source = _source(world, convs, scorer=scorer)
    episodes = source.collect([0, 1], ScriptedEngine(world, convs), _params(), step=1)
    assert calls == [6, 6]
    failed = [s for s in episodes.samples if s.index == 1]
    assert {(s.mask, s.reward) for s in failed} == {(MaskReason.REWARD_FAILED, None)}
    assert all("judge unavailable" in s.mask_detail for s in failed)
    assert all(s.mask is None and s.reward is not None for s in episodes.samples if s.index == 0)
    assert episodes.counts["reward_failed_calls"] == 1


def test_an_answerer_failure_masks_valid_samples_and_invalid_ones_keep_zero(world):
    class Broken:
        name = "broken"

        def answer(self, question, context):
            raise TimeoutError("answerer down (test)")

    convs = _convs(world)
    conv = convs[0]
    parts = replace(world["parts"], answerer=Broken())
    script = lambda c, k, g, agent: "not json" if (g, agent) == (1, "procedural") else None  # noqa: E731
    engine = ScriptedEngine(world, [conv], script)
    episodes = _source(world, [conv], parts=parts).collect([0], engine, _params(), step=1)
    invalid = [s for s in episodes.samples if (s.index, s.agent) == (1, "procedural")]
    valid = [s for s in episodes.samples if (s.index, s.agent) != (1, "procedural")]
    assert {(s.valid, s.reward, s.mask) for s in invalid} == {(False, 0.0, None)}  # v = 0: R = 0 whatever T is
    assert {(s.reward, s.mask) for s in valid} == {(None, MaskReason.REWARD_MASKED)}
    assert all("answerer down" in s.mask_detail for s in valid)


def test_empty_and_cut_answers_are_handled_as_for_dense_samples(world):
    convs = _convs(world)
    conv = convs[0]
    empty = _source(world, [conv]).collect([0], ScriptedEngine(world, [conv], tokens=0), _params(), step=1)
    # zero tokens: nothing to train on, the reward is kept (it counts in its group's statistics)
    assert {s.mask for s in empty.samples} == {MaskReason.EMPTY} and all(s.reward is not None for s in empty.samples)
    cut = _source(world, [conv], mask_truncated=True).collect(
        [0], ScriptedEngine(world, [conv], finish="length"), _params(), step=1)
    assert {s.mask for s in cut.samples} == {MaskReason.TRUNCATED}
    kept = _source(world, [conv]).collect([0], ScriptedEngine(world, [conv], finish="length"), _params(), step=1)
    assert {s.mask for s in kept.samples} == {None}


# ---------------------------------------------------------------------------------------------
# Data: the conversations file and the RL set agree
# ---------------------------------------------------------------------------------------------


def test_prepare_data_writes_the_rl_conversations_cut_to_their_prepared_sessions(world):
    manifest = json.loads((world["data"] / "manifest.json").read_text())
    assert manifest["conversations_file"] == "conversations.jsonl"
    f = world["file"]
    assert [c.conversation_id for c in f.conversations] == ["world-0-000", "world-0-001"]
    assert all(len(c.sessions) == 3 for c in f.conversations)
    assert f.render == {"top_k": 20, "max_prompt_chars": 24000, "max_turn_chars": 2000, "max_entry_chars": 1000}
    assert f.embedder == "hashing"
    convs = _convs(world)
    # every question once: the world asks 5 per session, no repeats across sessions
    assert [len(c.qa) for c in convs] == [15, 15]
    assert all(c.initial_snapshot_id == c.rows[0].first.snapshot_id for c in convs)
    empty = SnapshotStore(world["rl"].snapshots_dir).get(convs[0].initial_snapshot_id)
    assert empty.entries == () and state_digest(empty) == convs[0].initial_snapshot_id


def test_a_conversation_round_trips_every_field(tmp_path, world):
    d = datetime(2023, 5, 8, 13, 56)
    conv = Conversation(
        conversation_id="c/1", speakers=("Ann", "Bo"),
        sessions=(Session("s1", d, "1:56 pm on 8 May, 2023",
                          (Message("Ann", "user", "Hi é", "D1:1", image_caption="a cat", has_answer=True),
                           Message("Bo", "assistant", "Hey", "D1:2")), source_id="session_1"),
                  Session("s2", None, None, ())),
        questions=(Question("q1", "Who?", "Ann", "1", ("D1:1",), d, False, "nobody", ("s1",), "8 May"),),
        annotations=(SessionAnnotation("s1", d, "8 May", (Observation("Ann", "likes tea", ("D1:1",)),),
                                       (Event("Ann", "moved"),), "summary"),),
        dataset="locomo",
        background=CharacterMemory("Ann", {"age": "30"}, "desc", (Relation("r1", "Bo", "friend", "old friend"),),
                                   (LifeEvent("e1", "sum", "content", ("r1",), d, "2023", "work"),)))
    assert conversation_from_dict(json.loads(json.dumps(conversation_to_dict(conv)))) == conv
    path = write_conversations(tmp_path / "c.jsonl", [conv, *world["file"].conversations], render={"top_k": 5},
                               embedder="none")
    back = read_conversations(path)
    assert back.conversations == (conv, *world["file"].conversations) and back.render == {"top_k": 5}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text().replace('"speaker": "Ann"', '"speaker": 3', 1))
    where = r"bad.jsonl line 2: conversation.sessions\[0\].messages\[0\].speaker"
    with pytest.raises(ConversationFileError, match=where + " has the wrong type int"):
        read_conversations(bad)


def test_rows_and_conversations_that_disagree_are_refused(world):
    by_id = world["file"].by_id()
    with pytest.raises(ValueError, match="world-0-001.*not in the conversations file"):
        conversation_set(world["rl"].rows, {"world-0-000": by_id["world-0-000"]}, split=None)
    moved = [replace(r, session_index=2) if r.session_id == "world-0-000-s1" else r for r in world["rl"].rows]
    with pytest.raises(ValueError, match="index 2"):
        conversation_set(moved, by_id, split=None)


# ---------------------------------------------------------------------------------------------
# (5) the trainer
# ---------------------------------------------------------------------------------------------


def _cfg(world, out: Path, *overrides: str) -> ADRPOConfig:
    return load_config(ADRPOConfig, overrides=[
        f"model.path={world['base']}", f"checkpoint.output_dir={out}", "reward.dense=false",
        "data.world_conversations=2", "data.world_sessions=2", "data.sessions_per_step=1",
        "rollout.group_size=2", "rollout.max_tokens=8", "rollout.engine=transformers", "train.max_steps=1",
        "train.gradient_checkpointing=false", "logging.progress_bar=false", "logging.tensorboard=false", *overrides,
    ])  # fmt: skip


def test_remote_reward_or_a_subset_of_agents_with_sparse_rewards_is_a_config_error(world, tmp_path):
    cases = (("reward.kind=remote", "reward.kind=remote"), ('data.agents=["core","episodic"]', "four agents"))
    for override, match in cases:
        extra = [override] + (["reward.url=http://127.0.0.1:9"] if "remote" in override else [])
        cfg = _cfg(world, tmp_path, *extra)
        with pytest.raises(ConfigError, match=match):
            configured_source(SourceContext(cfg, tmp_path, world["base"], None, True))


@pytest.mark.slow
def test_one_trainer_step_with_sparse_rewards_on_the_tiny_world(world, tmp_path):
    import torch

    from trainers.adrpo import ADRPOTrainer
    from trainers.metrics import read_metrics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = ADRPOTrainer(_cfg(world, tmp_path / "run"))
        try:
            assert isinstance(trainer.episodes, ConversationEpisodes)
            assert len(trainer.episodes) == 1  # 2 conversations, one held out
            trainer.train()
        finally:
            trainer.close()
    finally:
        torch.set_num_threads(threads)
    (row,) = read_metrics(tmp_path / "run")
    # 1 conversation x 2 sessions x 4 agents x G = 2 samples, in 8 (session, agent) groups
    assert row["batch/samples"] == 16 and row["batch/groups"] == 8
    assert row["episodes/conversations"] == 1 and row["episodes/sessions"] == 2 and row["episodes/trajectories"] == 2
    assert row["batch/masked_reward_failed"] == 0 and row["batch/masked_no_qa"] == 0
    assert row["episodes/validity_mismatch"] == 0
    assert all(f"time/{k}_s" in row for k in ("rollout", "memory", "reward", "episodes", "update"))
    assert (tmp_path / "run" / "data" / "conversations.jsonl").is_file()
