"""`RewardConfig`: every knob of the session reward (DESIGN section 6), with the paper's values.

    R(g, m) = v(g, m) * T(g) * (1 - lambda * l(g, m))

- `dense` (default): each session is scored with its own QA. `dense=False` is one reward per
  conversation: the requests of one owner in a call form a conversation; its last request (in
  call order) is answered with the QA of all its requests, and that task reward T(g) (and its
  dominant kind) is broadcast to candidate g of every session of the conversation. Validity and
  length penalties stay per sample. Over the usual requests (each session from the EXPERT's state
  before it) this is only the SESSION-LEVEL APPROXIMATION of the paper's sparse ablation: the
  earlier sessions' outputs are not in the bank that is answered, so their T does not depend on
  them; do not train on it. The faithful sparse ablation is the trainer's `reward.dense=false`
  (`trainers/conversation_episodes.py`): G on-policy trajectories per conversation, each building
  its own memory session after session; it uses this mode with requests carrying each
  trajectory's own state before each session (one call per trajectory index g).
- `attribution` with `alpha`: the dominant kind's agent samples get weight alpha, all others 1.
  `tie_order` breaks ties between kinds with equal counts (first wins; the paper's run used
  episodic > semantic > procedural); no count, no boost; core is never counted and always 1.
- `length_penalty` with `lam` (lambda) and the thresholds of both penalties (`reward.length`).
- `counterfactual`: agent m's task reward is computed on the state before plus agent m's own
  output and the expert's outputs of the other three (`SessionRewardRequest.expert_outputs`
  required), so each agent is credited with its own effect. Off by default; not with sparse.
- `top_k`: entries retrieved per question (the answer step's default, 10).
- `call_timeout_s`: limit per answerer / judge call (None: no limit, for in-process answerers);
  `workers`: calls run at once (1: in the calling thread); `batch_size`: questions per call of
  an answerer / judge that has `answer_batch` / `judge_batch` (local models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from membuilder.types import InvalidInputError

SEARCHABLE = ("episodic", "semantic", "procedural")


@dataclass(frozen=True)
class RewardConfig:
    dense: bool = True
    attribution: bool = True
    alpha: float = 4.0
    tie_order: tuple[str, ...] = SEARCHABLE
    length_penalty: bool = True
    lam: float = 0.8
    theta_min: int = 150
    theta_max: int = 400
    gamma_l: float = 0.5
    gamma_u: float = 1.3
    upper: float = 2.0
    lower: float = 0.2
    min_diff: int = 200
    top_k: int = 10
    counterfactual: bool = False
    call_timeout_s: float | None = None
    workers: int = 1
    batch_size: int = 64
    base_cache: int = field(default=16)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidInputError(f"RewardConfig: {msg}")

        if self.alpha < 1:
            bad(f"alpha must be >= 1 (a boost), got {self.alpha}")
        if isinstance(self.tie_order, (list, tuple)):  # JSON configs give a list
            object.__setattr__(self, "tie_order", tuple(self.tie_order))
        if not isinstance(self.tie_order, tuple) or sorted(self.tie_order) != sorted(SEARCHABLE):
            bad(f"tie_order must order exactly {SEARCHABLE}, got {self.tie_order}")
        if not 0 <= self.lam <= 1:
            bad(f"lam must lie in [0, 1] (so the reward stays in [0, 1]), got {self.lam}")
        if not 0 <= self.theta_min < self.theta_max:
            bad(f"need 0 <= theta_min < theta_max, got {self.theta_min}, {self.theta_max}")
        if not 0 <= self.lower < self.gamma_l <= 1 <= self.gamma_u < self.upper:
            bad("need 0 <= lower < gamma_l <= 1 <= gamma_u < upper, got "
                f"{self.lower}, {self.gamma_l}, {self.gamma_u}, {self.upper}")
        if self.min_diff < 0:
            bad(f"min_diff must be >= 0, got {self.min_diff}")
        if self.top_k < 1 or self.workers < 1 or self.batch_size < 1 or self.base_cache < 1:
            bad("top_k, workers, batch_size and base_cache must be >= 1")
        if self.call_timeout_s is not None and self.call_timeout_s <= 0:
            bad(f"call_timeout_s must be > 0 or None, got {self.call_timeout_s}")
        if self.counterfactual and not self.dense:
            bad("counterfactual attribution is defined for dense rewards only")
