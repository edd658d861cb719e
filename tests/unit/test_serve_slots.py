"""The serving engine's continuous batching, its slot KV cache and its decode-graph path: rows joining mid-generation
(other prompt lengths), growing the cache, leaving and being refilled from the end still give exactly plain
transformers' greedy text, and share forward passes."""

import asyncio

import pytest
import torch
from helpers import greedy_reference


@pytest.fixture(scope="module")
def gqa_model_dir(corpus, tmp_path_factory):
    """A tiny Llama with grouped-query attention (2 key/value heads for 4), so the mask meets GQA's paths."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("served-gqa") / "tiny"
    tok = AutoTokenizer.from_pretrained(corpus["tokenizer"])
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def staggered(engine, prompts: list[str], tokens: int) -> list[str]:
    """The first prompt generates alone for a while, then the others join it at once."""
    from llmray.serve.engine import Finished
    from llmray.serve.sampling import Sampling

    async def collect(prompt: str, started: asyncio.Event | None = None) -> str:
        text = ""
        async for ev in engine.stream(engine.encode(prompt), Sampling(tokens, 0.0)):
            if not isinstance(ev, Finished):
                text += ev
                if started is not None and len(text) > 10:
                    started.set()
        return text

    async def run():
        first_running = asyncio.Event()
        first = asyncio.create_task(collect(prompts[0], first_running))
        await first_running.wait()
        late = await asyncio.gather(*[collect(p) for p in prompts[1:]])
        return [await first, *late]

    return asyncio.run(run())


@pytest.mark.parametrize("attention,graphs", [("sdpa", True), ("eager", False)])
def test_rows_join_grow_the_cache_and_leave_with_transformers_greedy_text(gqa_model_dir, attention, graphs):
    """Positions are allocated 8 at first, so the cache is reallocated under running rows; the
    three rows end at different steps, so freed slots are refilled from the end. With graphs (on CPU: the same
    fixed buffers, no capture) the batch is padded to its power-of-two bucket."""
    from llmray.serve.engine import Engine

    engine = Engine(str(gqa_model_dir), max_batch_size=4, batch_wait_s=0, device=None, cuda_graphs=graphs)
    engine.model.set_attn_implementation(attention)
    engine.cache.first_positions = 8
    prompts = ["def long_running_function(a, b, c):", "x", "import os, sys\nfrom pathlib import"]
    texts = staggered(engine, prompts, 40)
    reference = greedy_reference(gqa_model_dir)
    assert texts == [reference(p, 40) for p in prompts]
    assert engine.stats["largest_batch"] == 3 and engine.stats["forward_passes"] < 3 * 40
    assert engine.cache.reallocations >= 3
    assert engine.cache.lengths == [] and engine.cache.capacity == 0  # every row left; the grown buffers went
    assert (engine.stats["decode_graphs"] > 0) == graphs


def test_admit_takes_each_rows_own_tokens_and_keep_refills_holes_from_the_end():
    from transformers import DynamicCache

    from llmray.serve.slots import SlotCache

    lengths, width = [3, 5, 1, 4, 2], 5
    prefill = DynamicCache()
    for layer in range(2):  # row r's token t (counted from its first real one) holds 100*r + t; padding holds -1
        keys = torch.full((5, 2, width, 4), -1.0)
        for r, n in enumerate(lengths):
            keys[r, :, width - n:] = (100 * r + torch.arange(n, dtype=torch.float))[None, :, None]
        prefill.update(keys, -keys, layer)
    cache = SlotCache(layers=2, max_slots=8, max_positions=32, first_positions=4)
    cache.admit(prefill, lengths)
    assert (cache.slots, cache.capacity) == (8, 8)  # 5 rows, 5 + 1 positions: the next powers of two
    for r, n in enumerate(lengths):
        assert torch.equal(cache.layers[1].keys[r, 0, :n, 0], 100 * r + torch.arange(n, dtype=torch.float))
    order = cache.keep([0, 2, 4])
    assert order == [0, 4, 2]  # slot 1 (freed) takes row 4, the last; row 2 stays where it is
    assert cache.lengths == [3, 2, 1]
    assert torch.equal(cache.layers[0].values[1, 1, :2, 3], -(400 + torch.arange(2, dtype=torch.float)))
    assert cache.span(repeatable=False) == 4 and cache.span(repeatable=True) == 8  # SPAN_STEP, within the buffers
    cache.bind(torch.tensor([3, 2, 1]), 4)
    mask = cache.attention_mask(None)
    assert mask.shape == (3, 1, 1, 4) and mask[:, 0, 0, :].sum(-1).tolist() == [4, 3, 2]


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_layers_attend_within_their_window(corpus, tmp_path, arch):
    """Mistral slides on every layer (one 4-D mask); this Qwen2 on its second layer only (a mask per layer type).
    A window of 8 tokens, prompts and generations far longer: the served text is transformers' own."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from llmray.serve.engine import Engine
    from llmray.serve.slots import MaskLayout

    tok = AutoTokenizer.from_pretrained(corpus["tokenizer"])
    shape = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, initializer_range=0.3,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, sliding_window=8)
    if arch == "mistral":
        config, model_class, layout = MistralConfig(**shape), MistralForCausalLM, MaskLayout(8)
    else:
        config = Qwen2Config(use_sliding_window=True, max_window_layers=1, **shape)
        model_class, layout = Qwen2ForCausalLM, MaskLayout(8, per_type=True)
    torch.manual_seed(2)
    model_class(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = Engine(str(tmp_path), max_batch_size=4, batch_wait_s=0, device=None, cuda_graphs=True)
    assert engine.cache.masks == layout
    prompts = ["def long_running_function(a, b, c):", "x", "import os, sys\nfrom pathlib import"]
    reference = greedy_reference(tmp_path)
    assert staggered(engine, prompts, 40) == [reference(p, 40) for p in prompts]


def test_kv_budget_holds_rows_back_instead_of_running_out(gqa_model_dir):
    """A KV budget of two slots' worth of positions: rows that would grow the cache past it wait, and run one after
    another, each with transformers' greedy text; the cache never holds more than the budget. Without the budget
    the same three requests share a batch of four slots, over it. A request that could never fit is told so."""
    from llmray.serve.engine import Engine

    prompts = ["def long_running_function(a, b, c):", "x", "import os, sys\nfrom pathlib import"]
    reference = greedy_reference(gqa_model_dir)
    free = Engine(str(gqa_model_dir), max_batch_size=4, batch_wait_s=0.05, device=None)
    slot = free.cache.first_positions * free.kv_position_bytes  # one slot of the first allocation
    assert staggered(free, prompts, 40) == [reference(p, 40) for p in prompts]
    assert free.stats["largest_batch"] == 3 and free.stats["kv_bytes_peak"] == 4 * slot  # 3 rows: 4 slots

    held = Engine(str(gqa_model_dir), max_batch_size=4, batch_wait_s=0.05, device=None, kv_cache_bytes=2 * slot)
    assert staggered(held, prompts, 40) == [reference(p, 40) for p in prompts]
    assert held.stats["largest_batch"] == 1 and held.stats["kv_bytes_peak"] <= 2 * slot
    assert held.fits_alone(200, 55)  # the model's whole context: one slot, and its prefill
    held.kv_cache_bytes = slot  # one slot, and no room for the prefill's copy of the prompt
    assert not held.fits_alone(10, 40)
