"""int4 decode on a GPU: a random-init Llama quantized with torchao's int4-weight-only (tinygemm) against its bf16
self, on the same greedy prompts: tokens/s of batch-1 decoding, the share of greedy tokens that agree, and the
largest difference of the first step's log-probabilities.

    python benchmarks/gpu/int4_check.py --out int4.json [--hidden 2048 --layers 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import stdlib_corpus  # noqa: E402

from serve import PROMPTS, build_model  # noqa: E402


def decode(model, tok, tokens: int, prompts: int) -> tuple[list[list[int]], list, float]:
    """Greedy completions, the first step's log-probabilities, and decoded tokens/s (after one warm-up)."""
    import torch

    outs, firsts = [], []
    model.generate(tok(PROMPTS[0], return_tensors="pt").input_ids.to(model.device), max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        for prompt in PROMPTS[:prompts]:
            ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
            outs.append(out.sequences[0, ids.shape[1]:].tolist())
            firsts.append(torch.log_softmax(out.logits[0][0].float(), -1))
    torch.cuda.synchronize()
    return outs, firsts, prompts * tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import torch
    from transformers import AutoTokenizer

    from llmray.model.build import inference_device, load_for_inference
    from llmray.quantize.schemes import torchao_hf_config
    from llmray.recipe.schema import QuantSettings

    if not torch.cuda.is_available():
        sys.exit("int4_check: int4-weight-only is a CUDA kernel; no CUDA device here")
    _, tok_dir = stdlib_corpus()
    model_dir = build_model(tok_dir, args.hidden, args.layers)
    tok, device = AutoTokenizer.from_pretrained(model_dir), inference_device()
    runs = {}
    for name, config in (("bf16", None), ("int4", torchao_hf_config(QuantSettings(method="ptq", scheme="int4-weight-only")))):
        model = load_for_inference(model_dir, device, config)
        runs[name] = decode(model, tok, args.tokens, args.prompts)
        del model
        torch.cuda.empty_cache()
    (bf16, bf16_first, bf16_tps), (int4, int4_first, int4_tps) = runs["bf16"], runs["int4"]
    agree = sum(a == b for x, y in zip(bf16, int4) for a, b in zip(x, y)) / sum(len(x) for x in bf16)
    figures = {"device": torch.cuda.get_device_name(0), "model": {"hidden": args.hidden, "layers": args.layers},
               "tokens_per_s_bf16": round(bf16_tps, 1), "tokens_per_s_int4": round(int4_tps, 1),
               "speed_ratio": round(int4_tps / bf16_tps, 2), "greedy_token_agreement": round(agree, 3),
               "first_step_max_abs_logprob_diff": max((a - b).abs().max().item() for a, b in zip(bf16_first, int4_first)),
               "note": "random-init weights: agreement says the kernels compute alike, not quality"}
    Path(args.out).write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
