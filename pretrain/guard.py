"""NaN / loss-spike guard: the decisions, as plain Python (no DeepSpeed, no torch.distributed).

Large runs meet a non-finite loss, an overflowing gradient or a loss spike every so often; a person
should not have to restart them. The trainer asks this module three things, on every rank with the
same (all-reduced) inputs, so every rank takes the same decision:

1. :meth:`TrainingGuard.check_loss`: is this micro batch's loss (the mean over ranks) bad? Non-finite,
   or above ``spike_factor`` x the median of the last ``window`` accepted step losses. A bad step is
   skipped: the trainer never lets its update reach the weights.
2. :meth:`TrainingGuard.end_step`: after each optimizer step, what now? ``ok`` / ``skip``; after
   ``max_bad_steps`` bad steps within the last ``bad_window`` steps, ``rollback`` to the last complete
   checkpoint taken before the trouble began (the data stream keeps its position, so the batches
   after that checkpoint are skipped: the recipe large LM runs use, e.g. PaLM, Chowdhery et al. 2022,
   sec. 5.1); after ``max_rollbacks`` rollbacks, ``stop`` (:class:`TrainingDivergedError`, CLI exit
   :data:`DIVERGED_EXIT_CODE`).
3. :class:`FaultInjector`: the test hook ``train.guard.inject_faults`` that corrupts the loss (or only
   its gradient) at chosen batches, on all ranks or one.

The guard's state (loss history, recent bad steps, counters) is checkpointed with the trainer state,
so a resumed run takes the same decisions as the uninterrupted one.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from dataclasses import dataclass, field

import torch

# sysexits.h EX_DATAERR. Distinct from 1 (a crash), 2 (bad input/config) and 75 (requeue): the run
# keeps diverging from its own checkpoints; requeueing would loop, a person must look (LR, data).
DIVERGED_EXIT_CODE = 65
SPIKE_INJECT_FACTOR = 1000.0  # inject_faults "spike" multiplies the loss by this

NONFINITE_LOSS = "nonfinite_loss"
LOSS_SPIKE = "loss_spike"
NONFINITE_GRAD = "nonfinite_grad"
KINDS = (NONFINITE_LOSS, LOSS_SPIKE, NONFINITE_GRAD)


class TrainingDivergedError(RuntimeError):
    """The guard ran out of rollbacks; the message says what happened and what to do."""


@dataclass
class GuardConfig:
    """``train.guard``: skip bad steps, roll back after repeated trouble, stop after too many rollbacks.

    On by default: the checks cost one all-reduce of two numbers per micro batch, and the spike
    factor leaves a wide margin on healthy runs (19 runs of configs/demo.yaml, 620 steps each, losses
    logged every 10th step: the largest loss / median of the previous 5 logged losses was 1.26).
    """

    enabled: bool = True
    spike_factor: float = 3.0  # a loss above spike_factor x median(last `window` accepted step losses) is a spike
    window: int = 50  # accepted steps in the running median (no spike test before it is full)
    max_bad_steps: int = 5  # this many bad (skipped) steps within the last `bad_window` steps -> roll back
    bad_window: int = 50
    max_rollbacks: int = 3  # rollbacks allowed per run; the next trouble stops it (exit 65)
    # TEST HOOK, honoured only when set: "KIND@BATCHES[:RANK],..." with KIND nan | spike | gradnan,
    # BATCHES N, A-B or A+ (every batch from A on), RANK one rank (default all). See parse_faults.
    inject_faults: str | None = None

    def validate(self) -> None:
        if not self.spike_factor > 1.0:
            raise ValueError(f"spike_factor={self.spike_factor} must be > 1 "
                             "(a loss above spike_factor x the running median is a spike)")
        if self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1")
        if not 1 <= self.max_bad_steps <= self.bad_window:
            raise ValueError(f"max_bad_steps={self.max_bad_steps} must lie in [1, bad_window={self.bad_window}]")
        if self.max_rollbacks < 0:
            raise ValueError(f"max_rollbacks={self.max_rollbacks} must be >= 0 (0: stop at the first repeated trouble)")
        if self.inject_faults:
            parse_faults(self.inject_faults)


@dataclass(frozen=True)
class Fault:
    """One bad observation: what, and the number that showed it."""

    kind: str
    value: float


@dataclass
class Event:
    """What the trainer records (metrics.jsonl, TensorBoard, log) for each bad step."""

    kind: str
    step: int
    value: float
    action: str  # skip | rollback | stop
    detail: dict = field(default_factory=dict)  # e.g. the rollback's target step

    def record(self) -> dict:
        """The metrics.jsonl line; a non-finite value is written as a string ("nan", "inf"), which
        keeps the line valid JSON."""
        value = self.value if math.isfinite(self.value) else str(self.value)
        return {"step": self.step, "event": self.kind, "value": value, "action": self.action, **self.detail}


class TrainingGuard:
    """Decisions from the (rank-agreed) losses; :meth:`state_dict` is identical on every rank."""

    # checkpoints written before the guard existed have no "guard" state: they resume with a fresh guard
    state_optional = True

    def __init__(self, config: GuardConfig):
        self.config = config
        self.history: deque[float] = deque(maxlen=config.window)  # accepted step losses
        self.bad_steps: deque[int] = deque()  # skipped steps within the last `bad_window` steps
        self.rollbacks = 0
        self.skipped = 0
        self.drawn = 0  # step batches drawn from the data stream; survives rollbacks
        self.counts = {kind: 0 for kind in KINDS}

    # -- checks ------------------------------------------------------------------------------------
    def spike_threshold(self) -> float | None:
        """``spike_factor`` x the median of the last ``window`` accepted step losses; None until the
        history is full (early losses fall fast and a short median would be noise)."""
        if len(self.history) < self.config.window:
            return None
        return self.config.spike_factor * statistics.median(self.history)

    def check_loss(self, loss: float) -> Fault | None:
        """Is this loss bad? Pure: the history changes only in :meth:`end_step`."""
        if not math.isfinite(loss):
            return Fault(NONFINITE_LOSS, loss)
        threshold = self.spike_threshold()
        if threshold is not None and loss > threshold:
            return Fault(LOSS_SPIKE, loss)
        return None

    # -- decisions ---------------------------------------------------------------------------------
    def end_step(self, step: int, fault: Fault | None, loss: float) -> Event | None:
        """Book optimizer step ``step`` (``loss``: its mean loss; ``fault``: why it was skipped, None
        when its update was applied). Returns the event to record, whose ``action`` the trainer
        carries out, or None for a good step."""
        window_start = step - self.config.bad_window
        while self.bad_steps and self.bad_steps[0] <= window_start:
            self.bad_steps.popleft()
        if fault is None:
            self.history.append(loss)
            return None
        self.skipped += 1
        self.counts[fault.kind] += 1
        self.bad_steps.append(step)
        action = "skip"
        if len(self.bad_steps) >= self.config.max_bad_steps:
            action = "rollback" if self.rollbacks < self.config.max_rollbacks else "stop"
        return Event(fault.kind, step, fault.value, action)

    def rollback_before(self) -> int:
        """A rollback goes to the newest complete checkpoint with a step below this: the first bad step
        of the window. A checkpoint taken between bad steps holds no bad update (they were skipped),
        but the trouble had begun; the last one before it is the last known good state."""
        if not self.bad_steps:
            raise RuntimeError("rollback_before() called without a bad step in the window")
        return self.bad_steps[0]

    def rolled_back(self) -> None:
        """After the trainer restored a checkpoint: the trouble window starts over."""
        self.rollbacks += 1
        self.bad_steps.clear()

    def totals(self) -> dict[str, int]:
        """Counters for TensorBoard (``guard/<name>``)."""
        return {"events": sum(self.counts.values()), "skipped_steps": self.skipped, "rollbacks": self.rollbacks,
                **self.counts}

    # -- checkpoint --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": list(self.history), "bad_steps": list(self.bad_steps),
                "rollbacks": self.rollbacks, "skipped": self.skipped, "drawn": self.drawn, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque((float(v) for v in state["history"]), maxlen=self.config.window)
        self.bad_steps = deque(int(s) for s in state["bad_steps"])
        self.rollbacks, self.skipped, self.drawn = int(state["rollbacks"]), int(state["skipped"]), int(state["drawn"])
        self.counts = {kind: int(state["counts"].get(kind, 0)) for kind in KINDS}


# -- fault injection (test hook) -------------------------------------------------------------------
_FAULT = re.compile(r"^(?P<kind>nan|spike|gradnan)@(?P<first>\d+)(?:(?P<open>\+)|-(?P<last>\d+))?(?::(?P<rank>\d+))?$")
FAULT_KINDS = {"nan": "loss x NaN", "spike": f"loss x {SPIKE_INJECT_FACTOR:g}", "gradnan": "gradient x NaN, loss unchanged"}


@dataclass(frozen=True)
class FaultSpec:
    kind: str  # nan | spike | gradnan
    first: int
    last: int | None  # None: every batch from `first` on
    rank: int | None  # None: every rank

    def hits(self, batch: int, rank: int) -> bool:
        in_range = batch >= self.first and (self.last is None or batch <= self.last)
        return in_range and (self.rank is None or self.rank == rank)


def parse_faults(text: str) -> list[FaultSpec]:
    """``"nan@12,spike@30,gradnan@4-6:1,nan@20+"``. Batches count the step batches drawn from the data
    stream, from 1 (batch N is what step N trains on until a rollback; a rollback skips batches, so a
    fault at a single batch does not recur, while ``A+`` recurs on every later batch)."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        match = _FAULT.match(item)
        if not match:
            raise ValueError(f"inject_faults: cannot parse {item!r}; expected KIND@N, KIND@A-B or KIND@A+, optionally "
                             f":RANK, with KIND one of {', '.join(FAULT_KINDS)} (e.g. 'nan@12,spike@30:1')")
        first = int(match["first"])
        last = None if match["open"] else int(match["last"] or first)
        if first < 1 or last is not None and last < first:
            raise ValueError(f"inject_faults: {item!r} is an empty or invalid batch range (batches count from 1)")
        specs.append(FaultSpec(match["kind"], first, last, None if match["rank"] is None else int(match["rank"])))
    return specs


class FaultInjector:
    """Which corruption this rank applies to the loss of ``batch`` (the first matching spec wins)."""

    def __init__(self, text: str | None, rank: int):
        self.specs = parse_faults(text) if text else []
        self.rank = rank

    def __bool__(self) -> bool:
        return bool(self.specs)

    def kind_at(self, batch: int) -> str | None:
        for spec in self.specs:
            if spec.hits(batch, self.rank):
                return spec.kind
        return None


# -- the two places the guard touches tensors (the trainer calls them) ------------------------------
def poisoned(loss):
    """``loss`` x NaN, for ``engine.backward`` of a micro batch the guard rejected.

    Why poison rather than not step: DeepSpeed has no public call that drops the gradients already
    accumulated (and, under ZeRO 2/3, already reduced into partitions) and rewinds its micro-step
    counter. Its overflow path does exactly that: a non-finite gradient norm makes ``engine.step()``
    zero every gradient buffer and skip the optimizer and LR-schedule update (``engine.was_step_applied()``
    is then False). ZeRO 1-3 take that path in fp32 and bf16 (``bf16.check_grad_overflow``, set by
    ``pretrain.engine``); the trainer refuses ZeRO stage 0 in fp32, which has no such path."""
    return loss * float("nan")


def corrupt(loss, kind: str):
    """Apply an injected fault (:class:`FaultInjector`) to a micro batch's loss."""
    if kind == "nan":
        return loss * float("nan")
    if kind == "spike":
        return loss * SPIKE_INJECT_FACTOR
    if kind == "gradnan":
        return _NaNGradient.apply(loss)
    raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a bad gradient behind a finite loss."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")
