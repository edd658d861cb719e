"""`llmray`: shard a corpus, train a tokenizer, pretrain, export, serve. Each command says what it will do, and bad input
gets one line naming the file or key, not a stack trace from inside Ray."""

from __future__ import annotations

import argparse
import os
import sys
import threading


def _shard(args) -> None:
    from llmray.data.shard import shard_corpus

    include = tuple(p for chunk in args.include for p in chunk.split(","))
    print(f"sharding {', '.join(args.inputs)} ({', '.join(include)}) into {args.out}, ~{args.shard_size} per shard")
    report = shard_corpus(args.inputs, args.out, args.shard_size, include, args.text_field, args.overwrite,
                          tuple(args.exclude))
    print(report.summary())


def _tokenizer(args) -> None:
    from llmray.data.tokenizer import train_tokenizer

    print(f"training a byte-level BPE tokenizer of {args.vocab_size} tokens on {args.shards} into {args.out}")
    tok = train_tokenizer(args.shards, args.vocab_size, args.out, args.max_docs)
    print(f"saved {len(tok)} tokens to {args.out} (EOS {tok.eos_token!r})")


def _train(args) -> None:
    from llmray.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        import yaml

        from llmray.train.zero import deepspeed_config, resolve_precision

        print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        precision = resolve_precision(recipe, bf16_supported=True)
        print(f"# {recipe.scaling.num_workers} workers, {recipe.grad_accum_steps} accumulation steps, "
              f"{recipe.tokens_per_step:,} tokens per step; DeepSpeed config:")
        print(yaml.safe_dump(deepspeed_config(recipe, precision), sort_keys=False))
        return
    from llmray.train.trainer import fit

    summary = fit(recipe, resume_from=args.resume_from, fresh=args.fresh)
    print("\n" + summary.text())


def _export(args) -> None:
    from llmray.export import export

    print(f"exporting {args.checkpoint} to {args.out} ({args.dtype}, Hugging Face format)")
    info = export(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.overwrite, args.full_precision)
    print(f"wrote {info['parameters'] / 1e6:.2f}M parameters (step {info['step']}, {info['tokens']:,} tokens) to "
          f"{info['out']}: {', '.join(info['files'])}")
    if "quant_report" in info:
        from llmray.quant import report_text

        print(report_text(info["quant_report"]))


def _quantize(args) -> None:
    from llmray.config import quant_config
    from llmray.eval import HeldOut
    from llmray.quant import quantize_folder, report_text

    settings = {"method": "ptq", "scheme": args.scheme, "group_size": args.group_size}
    if args.skip is not None:  # else QuantConfig's default
        settings["skip"] = args.skip
    quant = quant_config(settings)
    held_out = None
    if args.eval_data:
        held_out = HeldOut(args.eval_data, args.eval_val_fraction, args.seq_len, args.seed)
    print(f"quantizing {args.model} with {args.scheme} into {args.out}")
    report = quantize_folder(args.model, args.out, quant, held_out, args.eval_samples, args.overwrite, args.device)
    print(report_text(report))


def _tune(args) -> None:
    from llmray.sweep.spec import load_sweep

    spec = load_sweep(args.sweep)
    if args.dry_run:
        print(f"sweep {spec.name}: {spec.method}, metric {spec.metric.name} ({spec.metric.goal}), budget "
              f"{spec.llmray.budget.amount} {spec.llmray.budget.unit} per trial")
        if spec.method == "grid":
            for i, point in enumerate(spec.grid()):
                print(f"  trial {i}: {point}")
        else:
            print(f"  {spec.run_cap} trials drawn from:")
            for key, param in spec.parameters.items():
                print(f"    {key}: {param.describe()}")
        return
    from llmray.sweep.run import run_sweep

    out = run_sweep(spec)
    print(f"results: {out['csv']}, {out['json']}, plot {out['plot']}; {out['trials']} trials, {out['failed']} failed")


def _serve(args) -> None:
    from ray import serve

    from llmray.serve.app import build_app
    from llmray.train.trainer import ensure_ray

    models = [{"path": p} for p in args.models]
    if args.name:
        if len(args.name) != len(models):
            from llmray.serve.app import ServeConfigError

            raise ServeConfigError(f"--name was given {len(args.name)} times for {len(models)} model folders")
        for m, n in zip(models, args.name):
            m["name"] = n
    actor = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    app = build_app({"models": models, "api_key": args.api_key, "max_batch_size": args.max_batch_size,
                     "batch_wait_ms": args.batch_wait_ms}, num_replicas=args.replicas, ray_actor_options=actor)
    ensure_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="llmray", route_prefix="/", blocking=False)
    print(f"serving {', '.join(m.get('name') or os.path.basename(m['path'].rstrip('/')) for m in models)} at "
          f"http://{args.host}:{args.port}/v1 (OpenAI API; GET /healthz); Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        serve.shutdown()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmray", description="Pretrain causal LMs with Ray Data, Ray Train and DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="corpus preparation").add_subparsers(dest="data_command", required=True)
    sh = data.add_parser("shard", help="write Parquet shards (text, doc_id, source) of a target size",
                         description="Stream text files (.txt .md .jsonl .parquet, or --include patterns) from local "
                                     "folders or s3:// gs:// URIs into Parquet shards; empty documents are skipped, "
                                     "undecodable bytes replaced and counted.")
    sh.add_argument("inputs", nargs="+", help="files or folders, local or URIs")
    sh.add_argument("--out", required=True, help="output folder or URI")
    sh.add_argument("--shard-size", default="64MB", help="target text bytes per shard (default 64MB)")
    sh.add_argument("--include", action="append", default=None,
                    help="file name patterns to take from folders, comma-separated (default *.txt,*.md,*.jsonl,*.parquet)")
    sh.add_argument("--exclude", action="append", default=[],
                    help="path patterns to leave out, e.g. '*/site-packages/*' (repeatable)")
    sh.add_argument("--text-field", default="text", help="JSON field / Parquet column holding the text")
    sh.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    sh.set_defaults(func=_shard)

    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tok_command", required=True)
    tt = tok.add_parser("train", help="train a byte-level BPE tokenizer on shards",
                        description="Train a byte-level BPE on the text of the shards, saved so that "
                                    "transformers.AutoTokenizer.from_pretrained(OUT) loads it.")
    tt.add_argument("shards", help="shard folder written by `llmray data shard`")
    tt.add_argument("--vocab-size", type=int, default=8000)
    tt.add_argument("--out", required=True)
    tt.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    tt.set_defaults(func=_tokenizer)

    tr = sub.add_parser("train", help="pretrain from a YAML recipe on the Ray cluster",
                        description="Pretrain from a recipe: Ray Data streams the shards into DeepSpeed ZeRO workers "
                                    "launched by Ray Train. Override any key with key=value, e.g. "
                                    "train.zero_stage=3 scaling.num_workers=2. Connects to the cluster in RAY_ADDRESS "
                                    "(as under `ray job submit`) or starts a local one.")
    tr.add_argument("recipe", help="YAML recipe, e.g. jobs/pretrain_tiny.yaml")
    tr.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys")
    tr.add_argument("--dry-run", action="store_true", help="print the resolved recipe and DeepSpeed config, run nothing")
    start = tr.add_mutually_exclusive_group()
    start.add_argument("--resume-from", metavar="CKPT", default=None,
                       help="start this (new) run from a checkpoint folder or URI, e.g. another run's checkpoint_...; "
                            "by default a run whose folder holds checkpoints continues from its latest")
    start.add_argument("--fresh", action="store_true",
                       help="start from step 0; refuses if the run already has checkpoints (never overwrites)")
    tr.set_defaults(func=_train)

    ex = sub.add_parser("export", help="a checkpoint into a Hugging Face model folder",
                        description="Consolidate a checkpoint's ZeRO shards (any stage, local or s3://) into a folder "
                                    "that transformers.AutoModelForCausalLM.from_pretrained loads: config.json, "
                                    "model.safetensors, tokenizer, generation_config.json.")
    ex.add_argument("checkpoint", help="checkpoint folder or URI, e.g. runs/demo/checkpoint_2026-...")
    ex.add_argument("--out", required=True, help="output folder (written whole, or not at all)")
    ex.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    ex.add_argument("--max-shard-size", default="2GB", help="split model.safetensors above this size")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ex.add_argument("--full-precision", action="store_true",
                    help="for a run with quant.method qat/ptq: write the unquantized weights instead")
    ex.set_defaults(func=_export)

    from llmray.config import INT4_GROUP_SIZES, QUANT_SCHEMES

    qz = sub.add_parser("quantize", help="post-training quantization (torchao) of an exported model folder",
                        description="Quantize a Hugging Face folder with torchao into a folder that "
                                    "from_pretrained and `llmray serve` load, and report held-out perplexity, "
                                    "weights on disk and generation tokens/s before and after (also saved as "
                                    "quant_report.json). Schemes: " +
                                    "; ".join(f"{k}: {v}" for k, v in QUANT_SCHEMES.items()))
    qz.add_argument("model", help="Hugging Face model folder, e.g. written by `llmray export`")
    qz.add_argument("--scheme", required=True, help=f"one of {', '.join(QUANT_SCHEMES)}")
    qz.add_argument("--out", required=True, help="output folder (written whole, or not at all)")
    qz.add_argument("--group-size", type=int, default=32,
                    help=f"int4 schemes: weights per scale, one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    qz.add_argument("--skip", action="append", default=None,
                    help="Linear layers to keep in full precision, by name, prefix or regex (repeatable; "
                         "default lm_head; embeddings are never quantized)")
    qz.add_argument("--eval-data", default=None,
                    help="shard folder to measure perplexity on (default: the training run's held-out split, "
                         "named in the folder's llmray_export.json)")
    qz.add_argument("--eval-val-fraction", type=float, default=0.0,
                    help="with --eval-data: use only this held-out fraction of its documents (0: all)")
    qz.add_argument("--seq-len", type=int, default=256, help="with --eval-data: tokens per sample")
    qz.add_argument("--seed", type=int, default=1234, help="with --eval-data: the run seed (sample order)")
    qz.add_argument("--eval-samples", type=int, default=64, help="held-out samples to measure on")
    qz.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    qz.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    qz.set_defaults(func=_quantize)

    tn = sub.add_parser("tune", help="a hyperparameter sweep (W&B sweep format) of whole training runs on Ray Tune",
                        description="Run the sweep file's trials with Ray Tune, each a full Ray Train + DeepSpeed run, "
                                    "logged to W&B as one sweep (offline without an API key). Rerunning a sweep "
                                    "that was interrupted resumes it. Ends with a leaderboard, results.csv/.json, "
                                    "sweep.png, and the best trial exported to best/ (under <storage>/<name>, or ./sweeps/<name> "
                                    "and <storage>/<name>/results for an object store).")
    tn.add_argument("sweep", help="sweep YAML, e.g. tune/lr_bs_quant.yaml")
    tn.add_argument("--dry-run", action="store_true", help="check the file and print the trials, run nothing")
    tn.set_defaults(func=_tune)

    sv = sub.add_parser("serve", help="serve exported models behind an OpenAI-compatible API (Ray Serve)",
                        description="Start Ray Serve on a local Ray (or the cluster in RAY_ADDRESS) with GET /v1/models, "
                                    "POST /v1/completions and /v1/chat/completions. For clusters and autoscaling use "
                                    "`serve run serve/config.yaml`.")
    sv.add_argument("models", nargs="+", help="exported model folders (llmray export) or s3:// URIs")
    sv.add_argument("--name", action="append", help="the model id clients ask for, once per folder (default: folder name)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 to expose it)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (default: $LLMRAY_API_KEY)")
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    sv.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    sv.add_argument("--max-batch-size", type=int, default=16, help="requests sharing one forward pass")
    sv.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    sv.set_defaults(func=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "data" and args.include is None:
        from llmray.data.shard import DEFAULT_INCLUDE

        args.include = [",".join(DEFAULT_INCLUDE)]
    from llmray.errors import USER_ERRORS

    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"llmray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
