"""Apply the four agents' raw outputs for one session to a bank, in one transaction.

`apply_agent_outputs` is the one place where agent text becomes memory: `MemoryBuilder` calls it
after its agents answer, and the reward calls it for every sampled candidate. Per agent it
returns what was parsed, applied and rejected (with reasons), the error that lost the agent's
work, and `valid`, the RL validity gate (DESIGN section 6):

    valid  <=>  the output parses against the agent's schema (`parse_agent_output`)
                AND the bank accepts every one of its operations as written.

"Accepts" is judged against the state before the session plus that agent's own operations
(`bank.validate`), and then again for the valid agents' operations together (a fixed point: an
agent whose operations fail only in combination, e.g. an UPDATE of an id it guessed would be
created, is invalid too). A core change that would pass the core limit is invalid: the bank
refuses it as written, and the validity gate has no compression step. Whether the builder's
compression step then rescues the change does not alter the verdict.

What is applied depends on `drop_invalid_agents`:
- False (the builder): every parsed operation is offered; the bank drops the ones it rejects and
  applies the rest (an agent with one bad UPDATE keeps its good ADDs);
- True (the reward): an invalid agent's operations are not applied at all; the other agents'
  still are.
Either way one `bank.apply(..., skip_invalid=True)` call writes everything: one transaction.
The verdicts are computed against the bank as it is when the call starts: nothing else may write
to the bank during the call (the builder's rule too; the reward gives each candidate its own
copy-on-write bank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from membuilder.bank import ApplyResult, MemoryBank
from membuilder.operations import Operation
from membuilder.types import InvalidInputError, MemoryKind

from .parsing import parse_agent_output
from .records import CompressionRecord

AGENT_ORDER: tuple[MemoryKind, ...] = (MemoryKind.CORE, MemoryKind.EPISODIC, MemoryKind.SEMANTIC,
                                       MemoryKind.PROCEDURAL)


@dataclass(frozen=True)
class AgentApplication:
    """What became of one agent's output. `applied` excludes what the bank rejected; for a
    compressed core change it is the compression's REWRITE."""

    kind: MemoryKind
    raw_output: str | None
    parsed: tuple[Operation, ...]
    applied: tuple[Operation, ...]
    rejected: tuple[str, ...]
    error: str | None
    valid: bool
    invalid_reason: str | None = None
    proposed_core: str | None = None  # core only: the block the agent's own change gives (no limit)
    compression: CompressionRecord | None = None


@dataclass(frozen=True)
class SessionApplication:
    """The outcome of `apply_agent_outputs`: per agent, and the bank's `ApplyResult`."""

    agents: dict[MemoryKind, AgentApplication]
    result: ApplyResult
    core_before: str
    core_after: str


def apply_agent_outputs(
    bank: MemoryBank,
    outputs: Mapping[MemoryKind | str, str | None],
    *,
    session_id: str,
    errors: Mapping[MemoryKind | str, str] | None = None,
    drop_invalid_agents: bool = False,
    compress: Callable[[str], CompressionRecord] | None = None,
) -> SessionApplication:
    """Parse, check and apply the agents' raw outputs in one transaction (see the module doc).

    `outputs` maps each agent's kind to its raw text (None: the agent gave no answer); agents
    absent from `outputs` take no part. `errors` names agents whose backend failed (their output
    is not used; the error is kept). `compress(proposed_core_text)` is the builder's compression
    step for a core change over the limit; without it such a change is dropped. A failure of the
    bank itself (store, embedder) raises and leaves the bank as it was.
    """
    if not isinstance(outputs, Mapping):
        raise InvalidInputError(f"outputs must map agent kinds to raw text, got {type(outputs).__name__}")
    given = {MemoryKind.parse(k): v for k, v in outputs.items()}
    core_before = bank.core
    failed = {MemoryKind.parse(k): v for k, v in (errors or {}).items()}
    kinds = [k for k in AGENT_ORDER if k in given or k in failed]

    parsed: dict[MemoryKind, tuple[Operation, ...]] = {}
    error: dict[MemoryKind, str | None] = {}
    invalid: dict[MemoryKind, str] = {}
    for kind in kinds:
        if kind in failed:
            error[kind] = invalid[kind] = failed[kind]
            continue
        result = parse_agent_output(kind, given[kind])
        if result.ok:
            parsed[kind] = result.operations
            error[kind] = None
        else:
            error[kind] = invalid[kind] = f"unparsable answer: {result.error}"

    # Each parsed agent alone against the state before: its own operations as written.
    to_apply: dict[MemoryKind, list[Operation]] = {k: list(ops) for k, ops in parsed.items()}
    alone_rejected: dict[MemoryKind, list[str]] = {}
    for kind, ops in parsed.items():
        reasons = [f"operations[{r.index}] {getattr(r.operation, 'action', '?')}: {r.reason}"
                   for r in bank.validate(ops)]
        if reasons:
            alone_rejected[kind] = reasons
            invalid[kind] = "the bank rejects " + "; ".join(reasons)

    core_notes: list[str] = []
    compression = None
    proposed = None
    core_ops = to_apply.get(MemoryKind.CORE)
    if core_ops:
        proposed = bank.proposed_core(core_ops)
        proposed_chars = len(proposed)
        if proposed_chars > bank.core_limit:
            core_notes.append(f"the core change would make the block {proposed_chars} characters, "
                              f"over the limit of {bank.core_limit}")
            invalid[MemoryKind.CORE] = core_notes[0]
            if compress is not None:
                compression = compress(proposed)
                if compression.operation is not None:
                    to_apply[MemoryKind.CORE] = [compression.operation]
                else:
                    error[MemoryKind.CORE] = f"core change over the limit and compression failed: {compression.error}"
                    to_apply[MemoryKind.CORE] = []
            else:
                error[MemoryKind.CORE] = "core change over the limit (compression is off)"
                to_apply[MemoryKind.CORE] = []

    if drop_invalid_agents:
        for kind in invalid:
            to_apply.pop(kind, None)
        # Valid alone but rejected together (rare: an id guessed across agents): invalid too.
        while to_apply:
            batch, owners = _batch(to_apply)
            together = bank.validate(batch)
            if not together:
                break
            for r in together:
                kind, j = owners[r.index]
                invalid.setdefault(kind, f"operations[{j}] {r.operation.action} is rejected together with the "
                                         f"other agents' operations: {r.reason}")
                to_apply.pop(kind, None)

    batch, owners = _batch(to_apply)
    result = bank.apply(batch, session_id=session_id, skip_invalid=True)
    rejected: dict[MemoryKind, list[str]] = {kind: [] for kind in kinds}
    rejected.get(MemoryKind.CORE, []).extend(core_notes)
    dropped: set[int] = set()
    for r in result.rejected:
        kind, j = owners[r.index]
        dropped.add(r.index)
        rejected[kind].append(f"operations[{j}] {r.operation.action}: {r.reason}")
    if drop_invalid_agents:  # nothing of theirs reached the bank: report why from the checks above
        for kind, reasons in alone_rejected.items():
            rejected[kind].extend(reasons)
    applied: dict[MemoryKind, list[Operation]] = {kind: [] for kind in kinds}
    for i, (op, (kind, _)) in enumerate(zip(batch, owners)):
        if i not in dropped:
            applied[kind].append(op)

    agents = {}
    for kind in kinds:
        agents[kind] = AgentApplication(
            kind=kind, raw_output=given.get(kind), parsed=parsed.get(kind, ()), applied=tuple(applied[kind]),
            rejected=tuple(rejected[kind]), error=error[kind], valid=kind not in invalid,
            invalid_reason=invalid.get(kind),
            proposed_core=proposed if kind is MemoryKind.CORE else None,
            compression=compression if kind is MemoryKind.CORE else None)
    return SessionApplication(agents=agents, result=result, core_before=core_before,
                              core_after=bank.core)


def _batch(ops: Mapping[MemoryKind, list[Operation]]) -> tuple[list[Operation], list[tuple[MemoryKind, int]]]:
    """One batch in agent order (core, episodic, semantic, procedural), with each op's owner."""
    batch, owners = [], []
    for kind in AGENT_ORDER:
        for j, op in enumerate(ops.get(kind, ())):
            batch.append(op)
            owners.append((kind, j))
    return batch, owners
