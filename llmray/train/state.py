"""The run's state between steps, typed: what a checkpoint stores besides the engine's tensors and the RNGs, and
what a resumed run continues from. Serialised here only (`to_json` / `from_json`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    history: list[dict] = field(default_factory=list)  # one entry of metrics per report
    stream: dict = field(default_factory=dict)  # the stream's state_dict() after `step` ({}: its beginning)
    resumes: list[dict] = field(default_factory=list)  # each time the run was resumed: step, world sizes, times
    trace: list[dict] = field(default_factory=list)  # with train.record_samples: each step's loss and sample ids
    world_size: int = 1  # the world size that wrote the checkpoint (its ZeRO shards are cut for it)
    n_params: int = 0
    vocab_size: int | None = None
    recipe: dict = field(default_factory=dict)  # the recipe that wrote the checkpoint, as JSON

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "TrainState":
        raw = dict(raw)
        if "cursor" in raw:  # written before the stream had a state_dict: the same position under another name
            raw["stream"] = raw.pop("cursor") or {}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})
