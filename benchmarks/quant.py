"""Quantization quality, size and speed on the machine at hand.

1. Pretrain a small Llama (default ~6M parameters: hidden 256, 4 layers, vocab 4000) on the interpreter's standard
   library with `llmray train` (2 workers, ZeRO-2), export it, and post-training-quantize the export with every
   scheme this machine runs. Each row: held-out perplexity before and after (the run's own 2 % split), weights on
   disk, and greedy batch-1 tokens/s, as ratios measured in this process.
2. QAT against PTQ at equal training: from the pretrained checkpoint, train K more steps twice, plain and with
   fake quantization (`quant.method=qat`), then quantize the plain one (PTQ) and convert the QAT one (export).
3. Size and speed at a size where weights, not Python, dominate decoding: a random-init ~91M-parameter Llama
   (hidden 768, 12 layers) quantized with every scheme. Untrained, so its perplexity rows say nothing.

    python benchmarks/quant.py [--steps 400] [--qat-steps 80] [--qat-scheme int8-dynamic-int4] [--skip-large]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from common import CACHE, emit, stdlib_corpus

RECIPE = str(Path(__file__).resolve().parents[1] / "jobs" / "pretrain_tiny.yaml")


def row(report: dict) -> dict:
    b, a = report["before"], report["after"]
    return {"method": report["method"], "scheme": report["scheme"], "ppl_before": b["ppl"], "ppl_after": a["ppl"],
            "ppl_delta": report["ppl_delta"], "ppl_delta_pct": 100 * (report["ppl_ratio"] - 1),
            "bytes_before": b["weights_bytes"], "bytes_after": a["weights_bytes"], "size_ratio": report["size_ratio"],
            "tokens_per_s_before": b["tokens_per_s"], "tokens_per_s_after": a["tokens_per_s"],
            "speed_ratio": report["speed_ratio"]}


def table(rows: list[dict]) -> str:
    lines = ["| method | scheme | ppl before → after | Δppl | size ratio | tokens/s before → after | speed ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['scheme']} | {r['ppl_before']:.3f} → {r['ppl_after']:.3f} | "
                     f"{r['ppl_delta']:+.3f} ({r['ppl_delta_pct']:+.2f} %) | {r['size_ratio']:.3f} | "
                     f"{r['tokens_per_s_before']:.0f} → {r['tokens_per_s_after']:.0f} | {r['speed_ratio']:.2f} |")
    return "\n".join(lines)


def random_llama(out: str, tokenizer: str, hidden: int, layers: int, heads: int, intermediate: int) -> int:
    """A random-init Llama saved with the corpus tokenizer; returns its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=intermediate, max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="pretraining steps (16 x 256 tokens each)")
    p.add_argument("--qat-steps", type=int, default=80, help="extra steps for the QAT-vs-PTQ comparison (0: skip)")
    p.add_argument("--qat-scheme", default="int8-dynamic-int4")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--skip-large", action="store_true", help="skip part 3 (the random-init 91M model)")
    args = p.parse_args()

    from llmray.evals.measure import report_text
    from llmray.export.folder import export
    from llmray.quantize.folder import quantize_folder
    from llmray.recipe.load import load_recipe
    from llmray.recipe.schema import GPU_ONLY_SCHEMES, SCHEMES, QuantSettings
    from llmray.train.trainer import fit

    shards, tok = stdlib_corpus()
    root = CACHE / "quant"
    shutil.rmtree(root, ignore_errors=True)

    def recipe(name: str, steps: int, *extra: str):
        return load_recipe(RECIPE, [
            f"data.shards={shards}", f"data.tokenizer={tok}", f"run.storage_path={root / 'runs'}", f"run.name={name}",
            "data.seq_len=256", "data.val_fraction=0.02", f"model.hidden_size={args.hidden}",
            f"model.num_layers={args.layers}", "model.num_heads=4", "train.micro_batch_size=8",
            "train.global_batch_size=16", f"train.max_steps={steps}", "train.lr=2e-3", "train.warmup_steps=20",
            "train.log_every=20", "train.eval_every=0", f"train.checkpoint_every={steps}", "train.zero_stage=2",
            "train.sample_prompt=null", *extra])

    started = time.time()
    base = fit(recipe("base", args.steps))
    full = str(root / "base-hf")
    export(base.checkpoint, full)
    on_gpu = torch.cuda.is_available()
    schemes = [s for s in SCHEMES if on_gpu or s not in GPU_ONLY_SCHEMES]

    def ptq_all(folder: str, tag: str, **kwargs) -> list[dict]:
        out = []
        for scheme in schemes:
            report = quantize_folder(folder, str(root / f"{tag}-{scheme}"), QuantSettings(method="ptq", scheme=scheme),
                                     eval_samples=args.eval_samples, **kwargs)
            print(report_text(report), flush=True)
            out.append(row(report))
        return out

    rows = ptq_all(full, "ptq")

    qat_rows = []
    if args.qat_steps:
        total = args.steps + args.qat_steps
        plain = fit(recipe("plain-more", total), resume_from=base.checkpoint)
        qat = fit(recipe("qat-more", total, "quant.method=qat", f"quant.scheme={args.qat_scheme}"),
                  resume_from=base.checkpoint)
        export(plain.checkpoint, str(root / "plain-more-hf"))
        ptq = quantize_folder(str(root / "plain-more-hf"), str(root / "plain-more-ptq"),
                              QuantSettings(method="ptq", scheme=args.qat_scheme), eval_samples=args.eval_samples)
        converted = export(qat.checkpoint, str(root / "qat-more-hf"))["quant_report"]
        for report in (ptq, converted):
            print(report_text(report), flush=True)
            qat_rows.append(row(report))

    large_rows, large_params = [], None
    if not args.skip_large:
        from llmray.data.split import HeldOut

        large = random_llama(str(root / "large-hf"), tok, hidden=768, layers=12, heads=12, intermediate=2048)
        large_params = large
        large_rows = ptq_all(str(root / "large-hf"), "large", held_out=HeldOut(shards, 0.02, 256))

    figures = {
        "machine": {"device": "cuda" if on_gpu else "cpu", "threads": torch.get_num_threads()},
        "model": {"parameters": base.n_params, "hidden": args.hidden, "layers": args.layers,
                  "pretrain_steps": base.steps, "pretrain_tokens": base.tokens, "val_ppl_at_end": base.val_ppl},
        "eval_samples": args.eval_samples, "ptq": rows,
        "qat_vs_ptq": {"extra_steps": args.qat_steps, "scheme": args.qat_scheme, "rows": qat_rows},
        "large_untrained": {"parameters": large_params, "rows": large_rows},
        "wall_s": time.time() - started,
    }
    print(table(rows))
    if qat_rows:
        print(f"\nafter {args.qat_steps} more steps from the same checkpoint:\n" + table(qat_rows))
    if large_rows:
        print(f"\nrandom-init {large_params / 1e6:.0f}M parameters (size and speed only):\n" + table(large_rows))
    emit("quant", figures)


if __name__ == "__main__":
    main()
