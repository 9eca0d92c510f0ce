"""ADRPO episodes of the long/short-term architecture (DESIGN section 9), for the same trainer.

The unit is one dialogue chunk (a `Session`) from the expert's memory state before it, with the
chunk's QA. One `collect` call, for the step's chunks:

1. the fact splitter: one prompt per chunk (state + chunk text), G samples (`n = G`), all chunks
   in one `generate` call;
2. for each splitter sample g: the long-term prompt (g's important facts, each with its top-k
   retrieved long-term memories) and the short-term prompt (state + g's unimportant facts), as
   `membuilder.longshort.reward.rollout_prompts` renders them (a role without input in g has no
   prompt; an unparsable split has none), sampled once each by the same policy, every chunk's
   and every g's prompts in one `generate` call (`n = 1`);
3. a short-term answer over the state limit gets its consolidation prompt, sampled once (a third
   call, only when one is over);
4. candidate g = state before + g's long-term decisions and state applied in one transaction; the
   chunk's questions are answered from it and judged (`score_longshort_group`, which this module
   calls and does not re-implement): R = v * T * (1 - lambda * l) per role, the splitter's minus
   `noop_weight` x its share of important facts that ended as NOOP; l against the world expert's
   answer length in policy tokens, for the roles where the expert answered.

Groups (advantages are computed per group, `Sample.index` = g):
- splitter: the G samples of the chunk's one prompt (a true GRPO group, shared prompt);
- long_term: the chunk's long-term samples, one per g that had important facts. Their prompts
  differ (each g shows its own facts and candidates), so this group compares G *trajectories* of
  the chunk, not G answers to one prompt; the trainer packs nothing for them (no shared prompt);
- short_term: likewise, one per g that had unimportant facts;
- consolidation: the compressions, one per g whose state was over the limit; scored with g's
  short-term reward (the state the bank took is the consolidated one).
A group with fewer than two scored samples gives zero advantages (counted by the trainer).

Masks, never a made-up reward: a chunk without QA (NO_QA), an answer or judge failure (the
reward masks candidate g's valid samples: REWARD_MASKED), an empty completion (EMPTY), a
completion cut at `max_tokens` when `mask_truncated` (TRUNCATED). An invalid answer is scored 0.

Data (`world_chunks`): the bundled world generated in process (deterministic, so every process
builds the same chunks), built session by session by `WorldLongShortExpert`; a chunk's state is
the expert's memory before it, its expert lengths the expert's answers. Chunks without QA are
left out (they could only be masked).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from membuilder.bank import MemoryBank
from membuilder.datasets import Session
from membuilder.longshort.backends import DEFAULT_STATE_LIMIT, WorldLongShortExpert
from membuilder.longshort.builder import DEFAULT_TOP_K, LongShortBuilder
from membuilder.longshort.prompts import DEFAULT_MAX_TRANSCRIPT_CHARS, render_splitter
from membuilder.longshort.reward import LongShortSample, consolidation_prompt, rollout_prompts, score_longshort_group
from membuilder.store import InMemoryStore
from membuilder.types import BankState
from reward.config import RewardConfig as LibraryRewardConfig
from reward.types import QAPair, SessionReward
from rollout.types import Completion, RolloutEngine, SamplingParams
from trainers.episodes import Episodes
from trainers.rl_batch import MaskReason, Sample, register_roles

logger = logging.getLogger(__name__)

# Group order within a chunk; "consolidation" samples are the short-term agent's second turn.
ROLES = ("splitter", "long_term", "short_term", "consolidation")
COUNT_KEYS = ("chunks", "follow_prompts", "consolidations", "candidates_answered")


@dataclass(frozen=True)
class Chunk:
    """One training unit: a chunk of dialogue, the memory state before it and its QA."""

    key: str  # "conversation_id/session_id", unique in the source
    session: Session
    state: BankState  # the memory (long-term entries + short-term state as core) before the chunk
    qa: tuple[QAPair, ...]
    # role -> the expert's answer for this chunk (lengths for the penalty); absent: no expert answer
    expert_outputs: dict[str, str] = field(default_factory=dict)
    query: str | None = None  # the splitter's "current query" (None: no query)


def world_chunks(seed: int = 0, conversations: int = 3, sessions: int = 4, *, embedder=None,
                 top_k: int = DEFAULT_TOP_K, state_limit: int = DEFAULT_STATE_LIMIT,
                 keep_empty_qa: bool = False) -> list[Chunk]:
    """The generated world's chunks, with the world expert's states before them (module doc)."""
    from membuilder.world import generate_world

    if conversations < 1 or sessions < 1:
        raise ValueError(f"world_chunks needs conversations >= 1 and sessions >= 1, got {conversations}, {sessions}")
    world = generate_world(seed, conversations=conversations, sessions=sessions)
    builder = LongShortBuilder(WorldLongShortExpert(world), top_k=top_k, state_limit=state_limit)
    chunks = []
    for wc in world:
        bank = MemoryBank(InMemoryStore(), wc.conversation_id, embedder=embedder)
        for index, session in enumerate(wc.conversation.sessions):
            state = bank.snapshot()
            record = builder.add_session(bank, session, session_index=index)
            errors = {r: rec.error for r, rec in record.agents.items() if rec.error}
            if errors:  # the expert is exact on its own world: an error here is a bug, not data
                raise RuntimeError(f"the world expert failed on {session.session_id}: {errors}")
            qa = tuple(QAPair.from_dict(q) for q in wc.session_qa(index))
            if not qa and not keep_empty_qa:
                continue
            expert = {str(getattr(r, "value", r)): rec.raw_output for r, rec in record.agents.items()
                      if rec.raw_output is not None}
            chunks.append(Chunk(f"{wc.conversation_id}/{session.session_id}", session, state, qa, expert))
    return chunks


@dataclass
class _Follow:
    """A prompt sampled once after the splitter: (chunk, g, role)."""

    chunk: int
    g: int
    role: str
    messages: list[dict]
    completion: Completion | None = None


class LongShortEpisodes:
    """`EpisodeSource` over long/short-term chunks (module doc). Not safe to call `collect`
    concurrently on one instance with a shared answerer / judge that is not thread-safe."""

    roles = ROLES

    def __init__(self, chunks: Sequence[Chunk], *, answerer, judge, embedder=None, top_k: int = DEFAULT_TOP_K,
                 state_limit: int = DEFAULT_STATE_LIMIT, answer_k: int = 10, noop_weight: float = 0.5,
                 count_tokens: Callable[[str], int] | None = None, reward_config: LibraryRewardConfig | None = None,
                 max_transcript_chars: int = DEFAULT_MAX_TRANSCRIPT_CHARS, mask_truncated: bool = False):
        if noop_weight < 0:
            raise ValueError(f"noop_weight must be >= 0, got {noop_weight}")
        if top_k < 1 or state_limit < 1 or answer_k < 1:
            raise ValueError(f"top_k, state_limit and answer_k must be >= 1, got {top_k}, {state_limit}, {answer_k}")
        keys = [c.key for c in chunks]
        if len(set(keys)) != len(keys):
            raise ValueError("chunk keys must be unique")
        self.chunks = list(chunks)
        self.answerer, self.judge, self.embedder = answerer, judge, embedder
        self.top_k, self.state_limit, self.answer_k = top_k, state_limit, answer_k
        self.noop_weight = noop_weight
        self.count_tokens = count_tokens
        self.reward_config = reward_config
        self.max_transcript_chars = max_transcript_chars
        self.mask_truncated = mask_truncated
        # Expert lengths in policy tokens, counted once (only with a counter: no counter, no penalty).
        self._expert_tokens = [
            {r: count_tokens(t) for r, t in c.expert_outputs.items()} if count_tokens is not None else None
            for c in self.chunks
        ]
        register_roles(ROLES)  # every process builds this source, so all report the same metric keys

    def __len__(self) -> int:
        return len(self.chunks)

    def splitter_prompt(self, chunk: Chunk) -> list[dict]:
        return render_splitter(chunk.session, chunk.state.meta.core, chunk.query,
                               max_transcript_chars=self.max_transcript_chars).messages

    def collect(self, indices: Sequence[int], engine: RolloutEngine, params: SamplingParams, *, step: int) -> Episodes:
        chunks = [self.chunks[i] for i in indices]
        started = time.perf_counter()
        G = params.n
        splits = _generate(engine, [self.splitter_prompt(c) for c in chunks], params)
        follow = []
        for i, c in enumerate(chunks):
            for g, comp in enumerate(splits[i]):
                prompts = rollout_prompts(c.state, c.session, comp.text, embedder=self.embedder, top_k=self.top_k,
                                          state_limit=self.state_limit)
                follow += [_Follow(i, g, role, prompts[role]) for role in ("long_term", "short_term") if role in prompts]
        once = replace(params, n=1)
        for f, out in zip(follow, _generate(engine, [f.messages for f in follow], once), strict=True):
            f.completion = out[0]
        cons = []
        for f in follow:
            if f.role == "short_term":
                prompt = consolidation_prompt(f.completion.text, self.state_limit)
                if prompt is not None:
                    cons.append(_Follow(f.chunk, f.g, "consolidation", prompt))
        for f, out in zip(cons, _generate(engine, [f.messages for f in cons], once), strict=True):
            f.completion = out[0]
        rolled = time.perf_counter()

        by_key = {(f.chunk, f.g, f.role): f.completion for f in follow + cons}
        samples: list[Sample] = []
        answered = 0
        for i, c in enumerate(chunks):
            texts = {key[1:]: comp.text for key, comp in by_key.items() if key[0] == i}
            outputs = [LongShortSample(splits[i][g].text, texts.get((g, "long_term")), texts.get((g, "short_term")),
                                       texts.get((g, "consolidation"))) for g in range(G)]
            reward = None
            if c.qa:
                reward = score_longshort_group(
                    c.state, c.session, c.qa, outputs, answerer=self.answerer, judge=self.judge,
                    embedder=self.embedder, top_k=self.top_k, state_limit=self.state_limit, answer_k=self.answer_k,
                    noop_weight=self.noop_weight, expert_tokens=self._expert_tokens[indices[i]],
                    count_tokens=self.count_tokens, config=self.reward_config)
                answered += sum(t is not None for t in reward.task_rewards)
            completions = {"splitter": dict(enumerate(splits[i]))}
            for (g, role), comp in ((k[1:], v) for k, v in by_key.items() if k[0] == i):
                completions.setdefault(role, {})[g] = comp
            group = (samples[-1].group + 1) if samples else 0
            for role in ROLES:
                members = completions.get(role)
                if not members:
                    continue
                for g in sorted(members):
                    samples.append(self._sample(group, c, role, g, members[g], reward))
                group += 1
        counts = {"chunks": float(len(chunks)), "follow_prompts": float(len(follow)),
                  "consolidations": float(len(cons)), "candidates_answered": float(answered)}
        return Episodes(samples, G, counts=counts,
                        times={"rollout": rolled - started, "reward": time.perf_counter() - rolled})

    def _sample(self, group: int, chunk: Chunk, role: str, g: int, completion: Completion,
                reward: SessionReward | None) -> Sample:
        sample = Sample(group, chunk.key, role, g, completion)
        if reward is None:
            sample.mask, sample.mask_detail = MaskReason.NO_QA, "the chunk has no QA pairs"
            return sample
        # The consolidation completes the short-term turn: it carries that turn's reward.
        r = reward.sample("short_term" if role == "consolidation" else role, g)
        if r.masked or r.reward is None:
            sample.mask = MaskReason.REWARD_MASKED
            sample.mask_detail = r.mask_reason or "masked by the reward function"
            return sample
        sample.reward, sample.task_reward = float(r.reward), r.task_reward
        sample.length_penalty, sample.valid = float(r.length_penalty), bool(r.valid)
        if sample.num_tokens == 0:
            sample.mask = MaskReason.EMPTY
        elif self.mask_truncated and sample.truncated:
            sample.mask = MaskReason.TRUNCATED
        return sample


def _generate(engine: RolloutEngine, prompts: list[list[dict]], params: SamplingParams) -> list[list[Completion]]:
    if not prompts:
        return []
    out = engine.generate(prompts, params)
    if len(out) != len(prompts) or any(len(o) != params.n for o in out):
        raise RuntimeError(f"the engine returned {[len(o) for o in out]} samples for {len(prompts)} prompts x {params.n}")
    return out


def configured_longshort_source(ctx) -> LongShortEpisodes:
    """The source `data.architecture: longshort` asks for (`trainers.episodes.configured_source`):
    the world's chunks (`data.world_*`), the configured answerer / judge / embedder, lengths in the
    policy's tokens, `reward.noop_weight` if the config has one (else 0.5)."""
    from transformers import AutoTokenizer

    from membuilder.api import make_embedder
    from membuilder.judging import LLMJudge, RuleJudge
    from membuilder.longshort.answer import LongShortAnswerer, OfflineAnswerAgent
    from trainers.config import ConfigError

    cfg = ctx.cfg
    d, r = cfg.data, cfg.reward
    if d.path is not None:
        raise ConfigError("data.architecture=longshort trains on the generated world (data.world_*); "
                          f"data.path={d.path!r} (an RL Parquet set of the four MemBuilder agents) does not apply")
    if r.kind != "local":
        raise ConfigError("data.architecture=longshort scores in process: set reward.kind=local")
    client = None
    if r.answerer != "extractive" or r.judge != "rule":
        from membuilder.llm import LLMClient, LLMConfig

        client = LLMClient(LLMConfig.from_env(base_url=r.base_url))
    answerer = OfflineAnswerAgent() if r.answerer == "extractive" else LongShortAnswerer(client, model=r.answerer)
    judge = RuleJudge() if r.judge == "rule" else LLMJudge(client, model=r.judge)
    embedder = make_embedder(None if r.embedder == "none" else r.embedder)
    tokenizer = AutoTokenizer.from_pretrained(ctx.base_path)
    chunks = world_chunks(cfg.train.seed, d.world_conversations or 3, d.world_sessions or 4, embedder=embedder)
    return LongShortEpisodes(
        chunks, answerer=answerer, judge=judge, embedder=embedder,
        noop_weight=r.noop_weight,
        count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        reward_config=LibraryRewardConfig(lam=r.length_lambda, call_timeout_s=r.call_timeout_s),
        mask_truncated=cfg.rollout.mask_truncated,
    )
