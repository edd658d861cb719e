"""Does intra-document masking (`data.document_masking`) change model quality? The same model trained twice by
llmray on the same tokens, with packed documents attending to each other (the default) and each attending only to
itself, then both scored on the same held-out rows two ways: as packed (a document may read the one before it) and
document by document (position ids restarting at each one: how a model reads a prompt when it is used).

The corpus is mixing_quality.py's (one standard-library package per shard, 10% of documents held out): whole
source files, mostly longer than a row, so few rows hold two documents. `--short` cuts every file into its
blank-line-separated paragraphs instead (a few dozen tokens each, several per row), where masking matters most.

    python benchmarks/document_masking.py [--short] [--steps 300]      # ~8 min on 2 CPUs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import CACHE, emit
from mixing_quality import EVAL_SAMPLES, llmray_run, topic_corpus

CODE = str(Path(__file__).resolve().parents[1])


def paragraph_corpus(shards: str) -> str:
    """The topic corpus's files cut at blank lines into documents of 3 lines or more, sharded once."""
    import json

    import pyarrow.parquet as pq

    from llmray.data.shard import shard_corpus

    root = CACHE / "paragraphs"
    out = root / "shards"
    if not (out / "_manifest.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        with (root / "paragraphs.jsonl").open("w") as f:
            for path in sorted(Path(shards).glob("*.parquet")):
                for text in pq.read_table(path, columns=["text"]).column(0).to_pylist():
                    for para in (text or "").split("\n\n"):
                        if para.count("\n") >= 2:
                            f.write(json.dumps({"text": para}) + "\n")
        shard_corpus([str(root / "paragraphs.jsonl")], str(out), shard_size="4MB", overwrite=True)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--short", action="store_true", help="paragraphs as documents, several to a row")
    p.add_argument("--seed", type=int, default=1234, help="run.seed of both trainings (their init and order)")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from llmray.data.pack import StreamSpec, first_rows
    from llmray.data.split import HeldOut
    from llmray.evals.perplexity import held_out_perplexity
    from llmray.recipe.schema import default

    shards, tok = topic_corpus()
    if args.short:
        shards = paragraph_corpus(shards)
    held_out = HeldOut(shards, 0.1, 128, 1234)
    spec = StreamSpec.of([("held-out", 1.0, held_out.documents)], tok, held_out.seq_len, held_out.seed,
                         batch_docs=default("data", "tokenize_batch_docs"), document_masking=True)
    rows = first_rows(spec, EVAL_SAMPLES)  # the same rows either way; the position ids say how they are read
    stamp = int(time.time())
    figures: dict = {"documents": "paragraphs" if args.short else "files", "seed": args.seed, "steps": args.steps,
                     "eval_samples": len(rows["input_ids"]), "seq_len": held_out.seq_len}
    for masking in (False, True):
        name = "masked" if masking else "packed"
        folder, wall = llmray_run(CODE, shards, tok, args.steps, CACHE / "masking-runs", f"{name}-{stamp}",
                                  (f"data.document_masking={str(masking).lower()}", f"run.seed={args.seed}"))
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        figures[f"trained_{name}"] = {
            "wall_s": round(wall, 1),
            "ppl_read_packed": held_out_perplexity(model, rows["input_ids"])["ppl"],
            "ppl_read_per_document": held_out_perplexity(model, rows["input_ids"], positions=rows["position_ids"])["ppl"],
        }
        print(f"[document_masking] trained {name}: {figures[f'trained_{name}']}", flush=True)
    for read in ("ppl_read_packed", "ppl_read_per_document"):
        figures[f"ratio_masked_over_packed_{read[4:]}"] = round(
            figures["trained_masked"][read] / figures["trained_packed"][read], 4)
    emit(("document_masking_paragraphs" if args.short else "document_masking")
         + ("" if args.seed == 1234 else f"_seed{args.seed}"), figures)


if __name__ == "__main__":
    main()
