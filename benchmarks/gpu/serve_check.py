"""In-process serving for a GPU session: llmray's engine (no Ray Serve, no HTTP) at each concurrency level against
one-by-one `generate`, its decode with CUDA graphs against eager (the same greedy tokens, their log-probabilities
equal within bf16's rounding), and what the allocator holds after many batch shapes.

    python benchmarks/gpu/serve_check.py --out serve.json [--hidden 2048 --layers 16] [--levels 1 16 64]

The figures so far are written to --out after each part, so a run stopped at its time limit keeps them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import stdlib_corpus  # noqa: E402

from serve import PROMPTS, baseline, build_model, engine_in_process  # noqa: E402


def graphs_against_eager(model_dir: str, tokens: int, rows: int) -> dict:
    """The same greedy rollouts with the decode step replayed as CUDA graphs and run eagerly."""
    from llmray.serve.engine import Engine
    from llmray.serve.sampling import Sampling

    runs = {}
    for graphs in (True, False):
        engine = Engine(model_dir, max_batch_size=rows, batch_wait_s=0.0, device=None, cuda_graphs=graphs)
        prompts = [engine.encode(p) for p in PROMPTS[:rows]]
        runs[graphs] = engine.generate(prompts, [Sampling(max_tokens=tokens, temperature=0.0, ignore_eos=True)] * rows)
        engine.release()
    on, off = runs[True], runs[False]
    diffs = [abs(a - b) for x, y in zip(on, off) for a, b in zip(x.logprobs, y.logprobs)]
    return {"rows": rows, "tokens": tokens, "same_tokens": all(x.tokens == y.tokens for x, y in zip(on, off)),
            "max_abs_logprob_diff": max(diffs) if diffs else None}


def memory_after_shapes(model_dir: str, tokens: int, max_batch_size: int) -> dict:
    """Reserved GPU memory after requests of many batch sizes and prompt lengths through one engine."""
    import torch

    from llmray.serve.engine import Engine
    from llmray.serve.sampling import Sampling

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    engine = Engine(model_dir, max_batch_size=max_batch_size, batch_wait_s=0.0, device=None)
    before = torch.cuda.memory_reserved()
    shapes = 0
    for rows in (1, 3, 8, 17, 33, max_batch_size):
        for repeat in (1, 4, 16):
            prompts = [engine.encode(p * repeat) for p in PROMPTS[:rows]]
            engine.generate(prompts, [Sampling(max_tokens=tokens, temperature=0.0, ignore_eos=True)] * rows)
            shapes += 1
    gib = 2 ** 30
    return {"shapes": shapes, "reserved_gib_before": round(before / gib, 2),
            "reserved_gib_after": round(torch.cuda.memory_reserved() / gib, 2),
            "max_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2),
            "allocated_gib_after": round(torch.cuda.memory_allocated() / gib, 2),
            "decode_graphs": engine.stats["decode_graphs"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="generated per request")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64], help="concurrency levels")
    p.add_argument("--requests", type=int, default=2, help="per client at each level")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import torch

    _, tok = stdlib_corpus()
    model_dir = build_model(tok, args.hidden, args.layers)
    top = max(args.levels)
    figures: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (rehearsal)",
                     "model": {"hidden": args.hidden, "layers": args.layers}, "tokens_per_request": args.tokens}

    def keep(key: str, value) -> None:
        figures[key] = value
        Path(args.out).write_text(json.dumps(figures, indent=1))
        print(f"[serve_check] {key}: {json.dumps(value)}", flush=True)

    keep("one_by_one_generate", baseline(model_dir, args.tokens, 4))
    levels = []
    for c in args.levels:
        levels.append(engine_in_process(model_dir, args.tokens, args.requests * c, top, c))
        levels[-1]["ratio_vs_one_by_one"] = round(levels[-1]["tokens_per_s"] / figures["one_by_one_generate"]["tokens_per_s"], 2)
        keep("engine_in_process", levels)
    keep("cuda_graphs_vs_eager", graphs_against_eager(model_dir, args.tokens, min(top, 16)))
    keep("memory_after_shapes", memory_after_shapes(model_dir, 16, top))


if __name__ == "__main__":
    main()
