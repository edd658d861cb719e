"""Does the stream's order cost model quality? llmray's held-out perplexity against a plain loop that draws random
windows from the whole corpus, same model, optimizer, schedule, clipping and tokens.

The corpus is built to punish a stream that reads shards one after another: each shard holds one topic (one
standard-library package), and 10% of the documents (by hash) are held out. Both models are scored by the same
function on the same held-out samples (`evals.perplexity.held_out_perplexity`). `--code PATH` trains with another
llmray checkout (for a before/after figure); the plain loop and the scoring always use this one.

    python benchmarks/mixing_quality.py                 # ~6 min on 2 CPUs
    python benchmarks/mixing_quality.py --code /path/to/old/llmray --tag before
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from common import CACHE, emit

TOPICS = ("json", "email", "logging", "http", "xml", "unittest", "asyncio", "multiprocessing", "importlib",
          "concurrent", "urllib", "tomllib", "sqlite3", "curses", "ctypes", "dbm", "wsgiref", "xmlrpc")
OVERRIDES = ["data.seq_len=128", "data.val_fraction=0.1", "model.hidden_size=128", "model.num_layers=4",
             "model.num_heads=4", "train.micro_batch_size=8", "train.global_batch_size=32", "train.lr=2e-3",
             "train.warmup_steps=30", "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=25",
             "train.sample_prompt=null", "scaling.num_workers=2"]
EVAL_SAMPLES = 256


def topic_corpus() -> tuple[str, str]:
    """One shard per topic (a standard-library package), and a BPE trained on all of them."""
    from llmray.data.shard import shard_corpus
    from llmray.data.tokenizer import train_tokenizer

    root = CACHE / "topics"
    shards, tok = root / "shards", root / "tok"
    if not shards.is_dir():
        stdlib = sysconfig.get_paths()["stdlib"]
        staging = root / "staging"
        shards.mkdir(parents=True)
        for i, topic in enumerate(TOPICS):
            if not Path(stdlib, topic).is_dir():
                continue
            shard_corpus([f"{stdlib}/{topic}"], str(staging / topic), shard_size="64MB", include=("*.py",),
                         overwrite=True, exclude=("*/test/*", "*/tests/*"))
            for j, part in enumerate(sorted((staging / topic).glob("*.parquet"))):
                part.rename(shards / f"{i:02d}-{topic}-{j}.parquet")
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(str(shards), 2000, str(tok))
    return str(shards), str(tok)


def llmray_run(code: str, shards: str, tok: str, steps: int, out: Path, tag: str,
               extra: tuple[str, ...] = ()) -> tuple[str, float]:
    """Train with the llmray at `code` (recipe overrides `extra` on top of OVERRIDES) and export; returns (Hugging
    Face folder, wall seconds). The commands run in `code` (`python -m` puts the working folder first on sys.path,
    before PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": code, "RAY_AUTH_MODE": "disabled"}
    started = time.perf_counter()
    cli = [sys.executable, "-m", "llmray.cli"]
    train = subprocess.run([*cli, "train", f"{code}/jobs/pretrain_tiny.yaml", f"data.shards={shards}",
                            f"data.tokenizer={tok}", f"run.storage_path={out}", f"run.name={tag}",
                            f"train.max_steps={steps}", *OVERRIDES, *extra], env=env, cwd=code, capture_output=True, text=True)
    if train.returncode:
        raise SystemExit(train.stdout[-3000:] + train.stderr[-3000:])
    wall = time.perf_counter() - started
    ckpt = next(line.split()[-1] for line in train.stdout.splitlines() if line.startswith("checkpoint "))
    folder = out / f"{tag}-hf"
    subprocess.run([*cli, "export", ckpt, "--out", str(folder), "--overwrite"], env=env, cwd=code, check=True,
                   capture_output=True)
    return str(folder), wall


def plain_loop(recipe, train_tokens: np.ndarray, steps: int, seed: int):
    """A single-process PyTorch loop: random seq_len windows from the whole training corpus, the recipe's model,
    AdamW settings, warmup+cosine schedule, clipping, batch and token budget."""
    import torch

    from llmray.model.build import build_model
    from llmray.train.schedule import make_scheduler

    torch.manual_seed(seed)
    t, seq = recipe.train, recipe.data.seq_len
    model = build_model(recipe.model, recipe_vocab(recipe))
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    sched = make_scheduler(t)(opt)  # the schedule llmray hands DeepSpeed
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        starts = rng.integers(0, len(train_tokens) - seq, size=t.global_batch_size)
        ids = torch.from_numpy(np.stack([train_tokens[s:s + seq] for s in starts]).astype(np.int64))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
    return model.eval()


def recipe_vocab(recipe) -> int:
    from llmray.data.tokenizer import load_tokenizer

    return len(load_tokenizer(recipe.data.tokenizer))


def corpus_tokens(shards: str, tok: str, part: str) -> np.ndarray:
    """Every `part` document ("train" or "val" of the 10% split), tokenized, EOS after each, concatenated."""
    import pyarrow.parquet as pq

    from llmray.data.corpus import list_shards
    from llmray.data.split import is_val_doc
    from llmray.data.tokenizer import load_tokenizer

    hf = load_tokenizer(tok)
    texts = []
    for s in list_shards(shards):
        table = pq.read_table(s.path, columns=["text", "doc_id"])
        texts += [t for t, d in zip(table.column(0).to_pylist(), table.column(1).to_pylist())
                  if t and is_val_doc(d, 0.1) == (part == "val")]
    ids = []
    for enc in hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids + [hf.eos_token_id]
    return np.array(ids, dtype=np.int32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="the llmray checkout to train with")
    p.add_argument("--tag", default="after")
    p.add_argument("--skip-plain", action="store_true", help="only the llmray run")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from llmray.data.split import HeldOut
    from llmray.evals.measure import held_out_samples
    from llmray.evals.perplexity import held_out_perplexity
    from llmray.recipe.load import load_recipe

    shards, tok = topic_corpus()
    out = CACHE / "mixing-runs"
    folder, wall = llmray_run(args.code, shards, tok, args.steps, out, f"mix-{args.tag}-{int(time.time())}")
    samples = held_out_samples(HeldOut(shards, 0.1, 128, 1234), folder, EVAL_SAMPLES)
    figures = {"corpus": {"topics": len(list(Path(shards).glob("*.parquet"))), "held_out": "10% of documents",
                          "eval_samples": len(samples)},
               "steps": args.steps, "tokens": args.steps * 32 * 128,
               f"llmray_{args.tag}": {**held_out_perplexity(AutoModelForCausalLM.from_pretrained(folder), samples),
                                      "wall_s": wall, "code": args.code}}
    if not args.skip_plain:
        recipe = load_recipe("jobs/pretrain_tiny.yaml", [f"data.shards={shards}", f"data.tokenizer={tok}",
                                                          f"train.max_steps={args.steps}", *OVERRIDES])
        started = time.perf_counter()
        plain = plain_loop(recipe, corpus_tokens(shards, tok, "train"), args.steps, recipe.run.seed)
        figures["plain_random_windows"] = {**held_out_perplexity(plain, samples), "wall_s": time.perf_counter() - started}
        figures["ppl_ratio"] = figures[f"llmray_{args.tag}"]["ppl"] / figures["plain_random_windows"]["ppl"]
    emit(f"mixing_quality_{args.tag}", figures)
    print(f"held-out perplexity: llmray ({args.tag}) {figures[f'llmray_{args.tag}']['ppl']:.1f}"
          + (f", plain loop {figures['plain_random_windows']['ppl']:.1f}, ratio {figures['ppl_ratio']:.3f}"
             if not args.skip_plain else ""))


if __name__ == "__main__":
    main()
