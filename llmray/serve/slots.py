"""The serving engine's KV cache: one slot per running request, allocated ahead and written in place.

A running row owns a slot. Its keys and values sit at positions 0..n-1 of that slot, whatever the other rows'
lengths, so a decode step writes one position per row (no concatenation per step, no left padding), a newcomer's
prefill is copied into the next free slot, and a finished row's slot is refilled by the last row (one row moves,
not the batch). The buffers grow by doubling (slots up to the batch limit, positions up to the model's span), so
reallocations are few; when the last row leaves, buffers grown past their first size are let go (one long request
must not size every later burst). A decode step attends the positions the longest row needs (rounded up to
`SPAN_STEP` when its shapes must repeat, for CUDA graphs: `graphs.py`), each row under a mask of its own
positions, and of its sliding window for layers that slide (`MaskLayout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache

FIRST_POSITIONS = 256  # positions allocated at first; doubled when a row outgrows them
SPAN_STEP = 64  # a graphed decode step attends a multiple of this many positions (more past 16 of them)


@dataclass(frozen=True)
class MaskLayout:
    """The decode masks a model's forward takes: one for every layer (full attention, or a sliding window on every
    layer, as Mistral), or transformers' dict by layer type where only some layers slide (Gemma 2/3, Qwen 2/3 with
    sliding layers, GPT-OSS)."""

    window: int | None = None  # the sliding window, where layers slide
    per_type: bool = False

    @classmethod
    def of(cls, config) -> "MaskLayout":
        window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
        if types is not None:
            return cls(window, True) if "sliding_attention" in types else cls()
        return cls(window) if window else cls()


def batch_bucket(rows: int, max_rows: int) -> int:
    """The decode batch a CUDA graph is captured for: the next power of two, at most the batch limit."""
    return min(max_rows, 1 << (rows - 1).bit_length())


class _SlotLayer:
    """One decoder layer's keys and values, [slots, kv heads, positions, head dim]. transformers' `Cache` asks
    a layer only what kind of attention it holds."""

    is_sliding = False
    is_compileable = True

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


class SlotCache(Cache):
    def __init__(self, layers: int, max_slots: int, max_positions: int, masks: MaskLayout = MaskLayout(),
                 first_positions: int = FIRST_POSITIONS):
        super().__init__(layers=[_SlotLayer() for _ in range(layers)])
        self.max_slots, self.max_positions, self.first_positions = max_slots, max_positions, first_positions
        self.masks = masks
        self.lengths: list[int] = []  # the tokens each running row holds; row i is in slot i
        self.reallocations = 0  # a captured decode step reads the buffers it was captured with: it must go
        self._rows: torch.Tensor | None = None  # 0..slots-1, sliced per step (made once: graphs need fixed tensors)
        self._write_at: torch.Tensor | None = None  # the decode step's position per row
        self._span = 0  # the positions the decode step attends

    @property
    def slots(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[0]

    @property
    def capacity(self) -> int:
        """Positions per slot."""
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[2]

    def release(self) -> None:
        """Every buffer let go (no row may be running); the next row allocates afresh."""
        for layer in self.layers:
            layer.keys = layer.values = None
        self.lengths = []
        self._rows = self._write_at = None
        self.reallocations += 1  # a captured decode step's buffers are gone with them

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers for t in (layer.keys, layer.values) if t is not None)

    def _plan(self, rows: int, positions: int, empty: bool = False) -> tuple[int, int]:
        """The (slots, positions) `reserve` allocates for `rows` rows of `positions` tokens (`empty`: from no
        buffers, as after `release`)."""
        slots, capacity = (0, 0) if empty else (self.slots, self.capacity)
        if rows <= slots and positions <= capacity:
            return slots, capacity
        return (max(slots, batch_bucket(rows, self.max_slots), rows),
                max(capacity, positions, min(self.max_positions, self.first_positions << max(
                    0, math.ceil(math.log2(positions / self.first_positions))))))

    def planned_bytes(self, rows: int, positions: int, position_bytes: int, empty: bool = False) -> int:
        """What the buffers take once they hold `rows` rows of up to `positions` tokens each; `position_bytes`:
        one slot's one position over every layer, keys and values."""
        slots, length = self._plan(rows, positions, empty)
        return slots * length * position_bytes

    def reserve(self, rows: int, positions: int, like: DynamicCache | None = None) -> None:
        """Room for `rows` slots of `positions` tokens. Short of it, every buffer is reallocated larger and its
        contents copied (`like`: a prefill cache giving the first allocation its heads, widths, dtype, device)."""
        if rows <= self.slots and positions <= self.capacity:
            return
        slots, length = self._plan(rows, positions)
        for layer, template in zip(self.layers, like.layers if like is not None else self.layers):
            for name in ("keys", "values"):
                old, shape_of = getattr(layer, name), getattr(template, name)
                new = shape_of.new_zeros((slots, shape_of.shape[1], length, shape_of.shape[3]))
                if old is not None:
                    new[:old.shape[0], :, :old.shape[2]] = old
                setattr(layer, name, new)
        self._rows = torch.arange(slots, device=self.layers[0].keys.device)
        self.reallocations += 1

    def admit(self, prefill: DynamicCache, lengths: list[int]) -> None:
        """A left-padded prefill's rows into the slots after the running rows': row j's last `lengths[j]`
        positions become positions 0.. of its slot."""
        first, width = len(self.lengths), prefill.layers[0].keys.shape[2]
        self.reserve(first + len(lengths), max(lengths) + 1, like=prefill)
        device = prefill.layers[0].keys.device
        shift = width - torch.tensor(lengths, device=device)
        index = (torch.arange(width, device=device)[None, :] + shift[:, None]).clamp(max=width - 1)
        for mine, theirs in zip(self.layers, prefill.layers):
            for name in ("keys", "values"):
                new = getattr(theirs, name)
                getattr(mine, name)[first:first + len(lengths), :, :width] = new.gather(
                    2, index[:, None, :, None].expand_as(new))
        self.lengths += lengths

    def keep(self, rows: list[int]) -> list[int]:
        """Keep these running rows (ascending indices) in slots 0..len(rows)-1: each slot freed below that is
        refilled by a kept row from above it. Returns, per slot, the index the row in it had before."""
        count, kept = len(rows), set(rows)
        order = list(range(count))
        holes = [i for i in range(count) if i not in kept]
        movers = [i for i in rows if i >= count]
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if not rows and self.capacity > self.first_positions:  # idle: let a long request's buffers go
            self.release()
        if holes:
            device = self.layers[0].keys.device
            to, src = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
            for layer in self.layers:
                layer.keys[to] = layer.keys[src]
                layer.values[to] = layer.values[src]
        self.lengths = [self.lengths[i] for i in order]
        return order

    def span(self, repeatable: bool) -> int:
        """The positions the next decode step attends: the longest row's and the one it adds; `repeatable`:
        rounded up (within the buffers) so the step's shapes repeat: to SPAN_STEP up to 16 of them, then to an
        eighth of the power of two above (about 8 shapes per doubling, under 1/8 attended in vain)."""
        need = max(self.lengths) + 1
        if not repeatable:
            return need
        step = SPAN_STEP << max(0, (need - 1).bit_length() - (16 * SPAN_STEP - 1).bit_length())
        return min(self.capacity, math.ceil(need / step) * step)

    def bind(self, positions: torch.Tensor, span: int) -> None:
        """The next forward is a decode step of rows 0..len(positions)-1 attending `span` positions, row i adding
        its token at positions[i]."""
        self._write_at, self._span = positions, span

    def attention_mask(self, additive_dtype: torch.dtype | None) -> torch.Tensor | dict[str, torch.Tensor]:
        """The bound decode step's 4-D mask, [rows, 1, 1, span]: each row sees its own tokens and the one it is
        adding (within its window, on sliding layers). Boolean for SDPA; added to the scores (0 or the dtype's
        minimum) for eager attention. A dict by layer type where only some layers slide."""
        positions = self._write_at[:, None]
        at = torch.arange(self._span, device=positions.device)[None, :]
        full = at <= positions
        window = self.masks.window
        slide = full & (at > positions - window) if window else full  # transformers' sliding_window_overlay

        def shaped(seen: torch.Tensor) -> torch.Tensor:
            seen = seen[:, None, None, :]
            if additive_dtype is None:
                return seen
            return torch.zeros(seen.shape, dtype=additive_dtype, device=seen.device).masked_fill(
                ~seen, torch.finfo(additive_dtype).min)

        if self.masks.per_type:
            return {"full_attention": shaped(full), "sliding_attention": shaped(slide)}
        return shaped(slide)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        layer, rows = self.layers[layer_idx], key_states.shape[0]
        if key_states.shape[2] != 1:
            raise RuntimeError("the slot cache takes one token per row (decode); prefills go through admit()")
        layer.keys[self._rows[:rows], :, self._write_at] = key_states[:, :, 0]
        layer.values[self._rows[:rows], :, self._write_at] = value_states[:, :, 0]
        return layer.keys[:rows, :, :self._span], layer.values[:rows, :, :self._span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.capacity

    def advance(self, rows: int) -> None:
        """Rows 0..rows-1 each took the token of the last decode step."""
        self.lengths[:rows] = [n + 1 for n in self.lengths[:rows]]
