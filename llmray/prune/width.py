"""Width pruning (Minitron's activation-based importance): shrink each decoder layer's MLP channels and attention
heads, and the hidden size the residual stream carries, keeping what is most active on the calibration text.

- MLP channel i of a layer: mean |act(gate(x)) * up(x)|_i, the down projection's input.
- Attention head h of a layer: mean ||head output||_2, the output projection's input per head. With grouped-query
  attention whole groups go (a key/value head with its query heads), so the group structure is kept.
- Hidden channel c: mean |x_c| of every normalisation's output (both of each layer's and the final one), summed:
  the channel is shared by every layer, so it is ranked once for the whole model.

Each layer keeps its own most important channels and heads, the same number in every layer (the config says one
width). The result is a smaller Hugging Face model of the same architecture: config.json names the new widths.
Llama-style decoders only (q/k/v/o_proj, gate/up/down_proj, RMS or layer norms): Llama, Mistral, Qwen2/3."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmray.prune.calibrate import flat, run_with_hooks

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class WidthShape:
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def shape_of(model) -> WidthShape:
    c = model.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return WidthShape(c.hidden_size, c.intermediate_size, heads, kv, head_dim)


def unsupported_layout(model) -> str | None:
    """Why width pruning cannot take this model, or None."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model.model, "norm"):
        return f"{type(model).__name__} has no model.layers and model.norm"
    layer = layers[0]
    for part, names in (("self_attn", ATTENTION), ("mlp", MLP)):
        block = getattr(layer, part, None)
        missing = [n for n in names if not isinstance(getattr(block, n, None), torch.nn.Linear)]
        if missing:
            return f"{type(model).__name__}'s layers have no {part}.{', '.join(missing)}"
    if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm")):
        return f"{type(model).__name__}'s layers have no input_layernorm and post_attention_layernorm"
    return None


def importance(model, samples) -> dict:
    """Activation importance on `samples`: per layer, its MLP channels and attention (key/value) groups; and the
    hidden channels."""
    shape = shape_of(model)
    layers = model.model.layers
    mlp = [torch.zeros(shape.intermediate_size, dtype=torch.float64) for _ in layers]
    heads = [torch.zeros(shape.heads, dtype=torch.float64) for _ in layers]
    hidden = torch.zeros(shape.hidden_size, dtype=torch.float64)
    tokens = [0]

    def on_down(i):
        def hook(module, args, output) -> None:
            x = flat(args[0])
            mlp[i].add_(x.abs().sum(0).double().cpu())
            if i == 0:
                tokens[0] += x.shape[0]
        return hook

    def on_o(i):
        def hook(module, args, output) -> None:
            x = flat(args[0]).reshape(-1, shape.heads, shape.head_dim)
            heads[i].add_(x.norm(dim=-1).sum(0).double().cpu())
        return hook

    def on_norm(module, args, output) -> None:
        hidden.add_(flat(output).abs().sum(0).double().cpu())

    hooks = {model.model.norm: on_norm}
    for i, layer in enumerate(layers):
        hooks.update({layer.mlp.down_proj: on_down(i), layer.self_attn.o_proj: on_o(i),
                      layer.input_layernorm: on_norm, layer.post_attention_layernorm: on_norm})
    run_with_hooks(model, samples, hooks)
    n = tokens[0]
    groups = [h.reshape(shape.kv_heads, shape.group).sum(-1) / n for h in heads]
    return {"mlp": [m / n for m in mlp], "groups": groups, "hidden": hidden / n}


def top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices of the `keep` highest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


def sliced_linear(linear: torch.nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> torch.nn.Linear:
    w = linear.weight.detach()
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.detach() if rows is None else linear.bias.detach()[rows])
    return out


def head_rows(groups: torch.Tensor, per_group: int, head_dim: int) -> torch.Tensor:
    """The projection rows of the heads in `groups` (each group `per_group` consecutive heads)."""
    heads = (groups[:, None] * per_group + torch.arange(per_group)[None, :]).reshape(-1)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def slice_norm(norm: torch.nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        p = getattr(norm, name, None)
        if isinstance(p, torch.nn.Parameter):
            setattr(norm, name, torch.nn.Parameter(p.detach()[keep].clone(), requires_grad=p.requires_grad))
    if hasattr(norm, "normalized_shape"):  # torch LayerNorm checks its input against it
        norm.normalized_shape = (len(keep),)


@torch.no_grad()
def shrink(model, scores: dict, target: WidthShape) -> dict:
    """Cut `model` in place to `target` by `scores` (from `importance`); returns what was kept, for the report."""
    shape = shape_of(model)
    keep_hidden = top(scores["hidden"], target.hidden_size) if target.hidden_size < shape.hidden_size else None
    kept_groups = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        groups = top(scores["groups"][i], target.kv_heads) if target.kv_heads < shape.kv_heads else None
        q_rows = None if groups is None else head_rows(groups, shape.group, shape.head_dim)
        kv_rows = None if groups is None else head_rows(groups, 1, shape.head_dim)
        kept_groups.append(None if groups is None else groups.tolist())
        channels = top(scores["mlp"][i], target.intermediate_size) \
            if target.intermediate_size < shape.intermediate_size else None
        attn.q_proj = sliced_linear(attn.q_proj, q_rows, keep_hidden)
        attn.k_proj = sliced_linear(attn.k_proj, kv_rows, keep_hidden)
        attn.v_proj = sliced_linear(attn.v_proj, kv_rows, keep_hidden)
        attn.o_proj = sliced_linear(attn.o_proj, keep_hidden, q_rows)
        mlp.gate_proj = sliced_linear(mlp.gate_proj, channels, keep_hidden)
        mlp.up_proj = sliced_linear(mlp.up_proj, channels, keep_hidden)
        mlp.down_proj = sliced_linear(mlp.down_proj, keep_hidden, channels)
        for name in ("num_heads", "num_key_value_heads"):  # older transformers keep the counts on the module
            if hasattr(attn, name):
                setattr(attn, name, target.heads if name == "num_heads" else target.kv_heads)
        if keep_hidden is not None:
            slice_norm(layer.input_layernorm, keep_hidden)
            slice_norm(layer.post_attention_layernorm, keep_hidden)
    if keep_hidden is not None:
        slice_norm(model.model.norm, keep_hidden)
        embed = model.get_input_embeddings()
        model.set_input_embeddings(torch.nn.Embedding.from_pretrained(
            embed.weight.detach()[:, keep_hidden].clone(), freeze=False, padding_idx=embed.padding_idx))
        if model.config.tie_word_embeddings:
            model.tie_weights()
        else:
            model.set_output_embeddings(sliced_linear(model.get_output_embeddings(), None, keep_hidden))
    c = model.config
    c.hidden_size, c.intermediate_size = target.hidden_size, target.intermediate_size
    c.num_attention_heads, c.num_key_value_heads = target.heads, target.kv_heads
    c.head_dim = shape.head_dim  # stated: the default (hidden / heads) would change with either
    return {"kept_hidden": None if keep_hidden is None else len(keep_hidden), "kept_groups": kept_groups}
