"""`llmray`: shard a corpus, train a tokenizer, pretrain, export, quantize, sweep, serve. Each command says what it
will do, and bad input gets one line naming the file or key, not a stack trace from inside Ray.

Option defaults are not written here: each is read from the typed recipe (`recipe.schema.default`) or from the signature
of the function the command calls, so `--help` shows what the library will do. Only the command being run builds
its options (and imports what it needs): `llmray --help` stays instant.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys


def default_of(fn, name: str):
    """The default of parameter `name` in `fn`'s signature."""
    return inspect.signature(fn).parameters[name].default


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# ---- commands: options, then what runs -------------------------------------------------------------------------

def _shard_options(p: argparse.ArgumentParser) -> None:
    from llmray.data.shard import DEFAULT_INCLUDE, shard_corpus

    p.add_argument("inputs", nargs="+", help="files or folders, local or URIs")
    p.add_argument("--out", required=True, help="output folder or URI")
    p.add_argument("--shard-size", default=default_of(shard_corpus, "shard_size"), help="target text bytes per shard")
    p.add_argument("--include", action="append", default=None,
                   help=f"file name patterns to take from folders, comma-separated (default {','.join(DEFAULT_INCLUDE)})")
    p.add_argument("--exclude", action="append", default=[],
                   help="path patterns to leave out, e.g. '*/site-packages/*' (repeatable)")
    p.add_argument("--text-field", default=default_of(shard_corpus, "text_field"),
                   help="JSON field / Parquet column holding the text")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")


def _shard(args) -> None:
    from llmray.data.shard import DEFAULT_INCLUDE, shard_corpus

    include = tuple(p for chunk in args.include for p in chunk.split(",")) if args.include else DEFAULT_INCLUDE
    print(f"sharding {', '.join(args.inputs)} ({', '.join(include)}) into {args.out}, ~{args.shard_size} per shard")
    report = shard_corpus(args.inputs, args.out, args.shard_size, include, args.text_field, args.overwrite,
                          tuple(args.exclude))
    print(report.summary())


def _tokenizer_options(p: argparse.ArgumentParser) -> None:
    from llmray.data.tokenizer import DEFAULT_VOCAB_SIZE

    p.add_argument("shards", help="shard folder written by `llmray data shard`")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--out", required=True)
    p.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")


def _tokenizer(args) -> None:
    from llmray.data.tokenizer import train_tokenizer

    print(f"training a byte-level BPE tokenizer of {args.vocab_size} tokens on {args.shards} into {args.out}")
    tok = train_tokenizer(args.shards, args.vocab_size, args.out, args.max_docs)
    print(f"saved {len(tok)} tokens to {args.out} (EOS {tok.eos_token!r})")


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe, e.g. jobs/pretrain_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and DeepSpeed config, run nothing")
    p.add_argument("--verbose", action="store_true",
                   help="also print Ray's, Ray Data's, Ray Train's and DeepSpeed's own log lines")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume-from", metavar="CKPT", default=None,
                       help="start this (new) run from a checkpoint folder or URI, e.g. another run's checkpoint_...; "
                            "by default a run whose folder holds checkpoints continues from its latest")
    start.add_argument("--fresh", action="store_true",
                       help="start from step 0; refuses if the run already has checkpoints (never overwrites)")


def _train(args) -> None:
    from llmray.recipe.load import load_recipe

    _run_training(args, load_recipe(args.recipe, args.overrides))


def _finetune(args) -> None:
    from llmray.recipe.load import load_recipe, recipe_from_dict
    from llmray.recipe.schema import FinetuneSettings

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.finetune is None:  # the command says what the recipe may leave out: LoRA by default
        recipe = recipe_from_dict({**recipe.model_dump(mode="json"), "finetune": FinetuneSettings().model_dump()})
    _run_training(args, recipe)


def _run_training(args, recipe) -> None:
    from llmray import logs

    if args.dry_run:
        import yaml

        from llmray.train.zero import deepspeed_config, resolve_precision

        print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        precision = resolve_precision(recipe, bf16_supported=True)
        print(f"# {recipe.scaling.num_workers} workers, {recipe.grad_accum_steps} accumulation steps, "
              f"{recipe.tokens_per_step:,} tokens per step; DeepSpeed config:")
        print(yaml.safe_dump(deepspeed_config(recipe, precision), sort_keys=False))
        return
    if args.verbose:
        logs.set_verbose(True)
    from llmray.prune.recover import with_pruned_model
    from llmray.train.trainer import fit

    summary = fit(with_pruned_model(recipe), resume_from=args.resume_from, fresh=args.fresh)
    print("\n" + summary.text())


def _export_options(p: argparse.ArgumentParser) -> None:
    from llmray.export.folder import DTYPES, export

    p.add_argument("checkpoint", help="checkpoint folder or URI, e.g. runs/demo/checkpoint_2026-..., or a run folder "
                                      "(its latest checkpoint)")
    p.add_argument("--out", required=True, help="output folder or s3:// gs:// URI (written whole, or not at all)")
    p.add_argument("--dtype", default=default_of(export, "dtype"), help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--max-shard-size", default=default_of(export, "max_shard_size"),
                   help="split model.safetensors above this size")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--full-precision", action="store_true",
                   help="for a run with quant.method qat/ptq: write the unquantized weights instead")
    p.add_argument("--adapter", action="store_true",
                   help="for a LoRA fine-tune: write the PEFT adapter folder instead of merged weights")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                   help="then publish the folder as this Hub model repository (created if needed; HF_TOKEN), with "
                        "a model card from its lineage: what trained it, on what, the recipe, its figures")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")


def _export(args) -> None:
    from llmray.evals.measure import report_text
    from llmray.export.folder import export

    print(f"exporting {args.checkpoint} to {args.out} ({args.dtype}, Hugging Face format)")
    info = export(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.overwrite, args.full_precision,
                  args.adapter)
    print(f"wrote {info['parameters'] / 1e6:.2f}M parameters (step {info['step']}, {info['tokens']:,} tokens) to "
          f"{info['out']}: {', '.join(info['files'])}")
    if "quant_report" in info:
        print(report_text(info["quant_report"]))
    if args.push_to_hub:
        from llmray.export.publish import push

        print(f"published to {args.push_to_hub}: {push(info['out'], args.push_to_hub, args.private)}")


def _eval_options(p: argparse.ArgumentParser) -> None:
    from llmray.evals.run import evaluate

    p.add_argument("target", help="an exported model folder (local or s3://), or an OpenAI-compatible server's URL, "
                                   "e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--task", action="append", required=True, metavar="FILE",
                   help="a task YAML (repeatable), e.g. tasks/stdlib_qa.yaml; see docs/evaluation.md")
    p.add_argument("--workers", type=int, default=default_of(evaluate, "workers"),
                   help="Ray actors sharing each task's examples, each holding the model (a GPU each, when there are)")
    p.add_argument("--model", default=None, help="for a URL: the model id (default: the first one /v1/models lists)")
    p.add_argument("--api-key", default=None, help="for a URL: its key (default: $OPENAI_API_KEY)")
    p.add_argument("--out", default=default_of(evaluate, "out"), help="where the figures and answers go (JSON)")


def _eval(args) -> None:
    from llmray.evals.run import evaluate, table

    print(f"evaluating {args.target} on {len(args.task)} tasks")
    results = evaluate(args.target, args.task, args.workers, args.model,
                       args.api_key or os.environ.get("OPENAI_API_KEY"), args.out)
    print(table(results))
    print(f"figures and every answer in {args.out}")


def _prune_options(p: argparse.ArgumentParser) -> None:
    from llmray.recipe.schema import PRUNE_METHODS, PruneSettings

    p.add_argument("model", help="an exported Hugging Face folder (llmray export), with its held-out set recorded")
    p.add_argument("--method", required=True, choices=PRUNE_METHODS)
    p.add_argument("--out", required=True, help="output folder (written whole, or not at all)")
    p.add_argument("--drop-layers", type=int, default=None, help="depth: how many decoder layers to remove")
    p.add_argument("--hidden-size", type=int, default=None, help="width: the hidden size kept")
    p.add_argument("--intermediate-size", type=int, default=None, help="width: the MLP channels kept per layer")
    p.add_argument("--heads", type=int, default=None,
                   help="width: the attention heads kept per layer (grouped-query: a multiple of the group size)")
    p.add_argument("--sparsity", type=float, default=None, help="magnitude/wanda: the share of weights zeroed, 0-1")
    p.add_argument("--pattern", default=None, help="magnitude/wanda: N:M semi-structured instead, e.g. 2:4")
    p.add_argument("--calibration-samples", type=int, default=PruneSettings.model_fields["calibration_samples"].default,
                   help="held-out samples to rank on and to measure on")
    p.add_argument("--recover-steps", type=int, default=None,
                   help="then retrain this many steps on the recipe the export recorded: structured pruning "
                        "distils from the unpruned model, unstructured keeps its zeros (run folder: OUT-recovery)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recovery recipe key, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _prune(args) -> None:
    from llmray.evals.measure import report_text
    from llmray.recipe.schema import PruneSettings

    spec = PruneSettings(method=args.method, drop_layers=args.drop_layers, hidden_size=args.hidden_size,
                       intermediate_size=args.intermediate_size, heads=args.heads, sparsity=args.sparsity,
                       pattern=args.pattern, calibration_samples=args.calibration_samples)
    print(f"pruning {args.model} ({args.method}) into {args.out}")
    if args.recover_steps is None:
        from llmray.prune.folder import prune_folder

        report = prune_folder(args.model, args.out, spec, args.overwrite)
    else:
        from llmray.prune.recover import recover

        report = recover(args.model, args.out, spec, args.recover_steps, args.overrides, args.overwrite)
    print(report_text(report))


def _quantize_options(p: argparse.ArgumentParser) -> None:
    from llmray.quantize.folder import quantize_folder
    from llmray.recipe.schema import INT4_GROUP_SIZES, SCHEMES, default

    p.description += " Schemes: " + "; ".join(f"{k}: {v}" for k, v in SCHEMES.items())
    p.add_argument("model", help="Hugging Face model folder, e.g. written by `llmray export`")
    p.add_argument("--scheme", required=True, help=f"one of {', '.join(SCHEMES)}")
    p.add_argument("--out", required=True, help="output folder or s3:// gs:// URI (written whole, or not at all)")
    p.add_argument("--group-size", type=int, default=default("quant", "group_size"),
                   help=f"int4 schemes: weights per scale, one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    p.add_argument("--skip", action="append", default=None,
                   help="Linear layers to keep in full precision, by name, prefix or regex (repeatable; default "
                        f"{','.join(default('quant', 'skip'))}; embeddings are never quantized)")
    p.add_argument("--eval-data", default=None,
                   help="shard folder to measure perplexity on (default: the training run's held-out split, "
                        "named in the folder's llmray_export.json)")
    p.add_argument("--eval-val-fraction", type=float, default=0.0,
                   help="with --eval-data: use only this held-out fraction of its documents (0: all)")
    p.add_argument("--seq-len", type=int, default=default("data", "seq_len"), help="with --eval-data: tokens per sample")
    p.add_argument("--seed", type=int, default=default("run", "seed"), help="with --eval-data: the run seed (sample order)")
    p.add_argument("--eval-samples", type=int, default=default_of(quantize_folder, "eval_samples"),
                   help="held-out samples to measure on")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _quantize(args) -> None:
    from llmray.data.split import HeldOut
    from llmray.evals.measure import report_text
    from llmray.quantize.folder import quantize_folder
    from llmray.recipe.load import quant_settings

    settings = {"method": "ptq", "scheme": args.scheme, "group_size": args.group_size}
    if args.skip is not None:  # else QuantSettings's default
        settings["skip"] = args.skip
    quant = quant_settings(settings)
    held_out = HeldOut(args.eval_data, args.eval_val_fraction, args.seq_len, args.seed) if args.eval_data else None
    print(f"quantizing {args.model} with {args.scheme} into {args.out}")
    report = quantize_folder(args.model, args.out, quant, held_out, args.eval_samples, args.overwrite, args.device)
    print(report_text(report))


def _tune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep YAML, e.g. tune/lr_bs_quant.yaml")
    p.add_argument("--dry-run", action="store_true", help="check the file and print the trials, run nothing")


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


def _serve_options(p: argparse.ArgumentParser) -> None:
    from llmray.serve.app import ServeArgs
    from llmray.serve.launch import serve_models

    fields = ServeArgs.model_fields
    p.add_argument("models", nargs="+", help="exported model folders (llmray export) or s3:// URIs")
    p.add_argument("--name", action="append", help="the model id clients ask for, once per folder (default: folder name)")
    p.add_argument("--adapter", action="append", metavar="NAME=FOLDER",
                   help="a LoRA adapter of the model (llmray export --adapter), served as model id NAME and batched "
                        "with the base (repeatable)")
    p.add_argument("--host", default=default_of(serve_models, "host"), help="bind address (0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=default_of(serve_models, "port"))
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (default: $LLMRAY_API_KEY)")
    p.add_argument("--replicas", type=int, default=default_of(serve_models, "replicas"))
    p.add_argument("--num-cpus", type=float, default=default_of(serve_models, "num_cpus"), help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=default_of(serve_models, "num_gpus"), help="GPUs per replica")
    p.add_argument("--max-batch-size", type=int, default=fields["max_batch_size"].default,
                   help="requests sharing one forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=fields["batch_wait_ms"].default,
                   help="how long a batch waits to fill")
    p.add_argument("--max-waiting-requests", type=int, default=fields["max_waiting_requests"].default,
                   help="rows queued per model and replica beyond the batch; past them, 429 with Retry-After")
    p.add_argument("--request-timeout-s", type=float, default=fields["request_timeout_s"].default,
                   help="a request unfinished this long after reaching its replica gets 408")
    p.add_argument("--kv-cache-bytes", type=int, default=fields["kv_cache_bytes"].default,
                   help="KV cache budget per model (default: GPU free memory, or half the host's available)")
    p.add_argument("--allowed-image-path", action="append", default=[], metavar="PREFIX",
                   help="a folder (local or s3://) chat image parts may name by path or URI (repeatable; without "
                        "one, data: URIs only)")
    p.add_argument("--max-images-per-request", type=int, default=fields["max_images_per_request"].default,
                   help="image parts a chat request may hold")
    p.add_argument("--max-image-bytes", type=int, default=fields["max_image_bytes"].default,
                   help="each image's size, encoded")


def _serve(args) -> None:
    from llmray.serve.launch import serve_models

    serve_models(args.models, args.name, host=args.host, port=args.port, api_key=args.api_key,
                 replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                 max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, adapters=args.adapter,
                 max_waiting_requests=args.max_waiting_requests, request_timeout_s=args.request_timeout_s,
                 kv_cache_bytes=args.kv_cache_bytes, allowed_image_paths=args.allowed_image_path,
                 max_images_per_request=args.max_images_per_request, max_image_bytes=args.max_image_bytes)


def _compose_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vision", required=True, help="a CLIP or SigLIP vision encoder folder (or URI) with its image "
                                                   "processor")
    p.add_argument("--language-model", required=True, help="a causal LM folder (or URI) with its tokenizer, e.g. "
                                                           "an `llmray export`")
    p.add_argument("--out", required=True, help="the LLaVA folder to write (whole, or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _compose(args) -> None:
    from llmray.model.compose import compose_llava

    print(f"composing {args.vision} + a new projector + {args.language_model} into {args.out} (LLaVA)")
    made = compose_llava(args.vision, args.language_model, args.out, args.overwrite)
    print(f"wrote {made['out']}: {', '.join(made['files'])}; projector {made['projector_parameters']:,} parameters "
          f"(new), {made['image_tokens']} tokens an image. Stage 1: llmray finetune with vision.train_language_model="
          "false on captions; stage 2: the stage-1 export, full or LoRA, on instructions (docs/vision.md)")


# (path of words, one-line help, description, options, run)
COMMANDS = [
    (("data", "shard"), "write Parquet shards (text, doc_id, source) of a target size",
     "Stream text files (.txt .md .jsonl .parquet, or --include patterns) from local folders or s3:// gs:// URIs "
     "into Parquet shards; empty documents are skipped, undecodable bytes replaced and counted.",
     _shard_options, _shard),
    (("tokenizer", "train"), "train a byte-level BPE tokenizer on shards",
     "Train a byte-level BPE on the text of the shards, saved so that transformers.AutoTokenizer.from_pretrained(OUT) "
     "loads it.", _tokenizer_options, _tokenizer),
    (("train",), "pretrain from a YAML recipe on the Ray cluster",
     "Pretrain from a recipe: Ray Data streams the shards into DeepSpeed ZeRO workers launched by Ray Train. Override "
     "any key with key=value, e.g. train.zero_stage=3 scaling.num_workers=2. Connects to the cluster in RAY_ADDRESS "
     "(as under `ray job submit`) or starts a local one.", _train_options, _train),
    (("finetune",), "fine-tune a pretrained model on conversations (full or LoRA) from a YAML recipe",
     "Supervised fine-tuning of model.pretrained on data.conversations (OpenAI messages, Alpaca or ShareGPT JSONL), "
     "loss on the assistant's tokens only, conversations packed without attending to each other; finetune.method "
     "full or lora (the default). Same options and cluster behaviour as `llmray train`.", _train_options, _finetune),
    (("vision", "compose"), "a LLaVA model from a vision encoder folder and a language model folder",
     "Join a CLIP or SigLIP vision encoder and a causal LM (one llmray pretrained included) with a new projector into "
     "one folder that transformers.AutoModelForImageTextToText and AutoProcessor load, `<image>` added to the "
     "tokenizer; then fine-tune it in LLaVA's two stages (docs/vision.md).", _compose_options, _compose),
    (("export",), "a checkpoint into a Hugging Face model folder",
     "Consolidate a checkpoint's ZeRO shards (any stage, local or s3://) into a folder that "
     "transformers.AutoModelForCausalLM.from_pretrained loads: config.json, model.safetensors, tokenizer, "
     "generation_config.json; locally or in object storage.", _export_options, _export),
    (("eval",), "score a model folder or an OpenAI-compatible server on task files",
     "Perplexity, BLEU/chrF, accuracy/macro-F1, exact match and token F1 on small task YAMLs (a JSONL file and its "
     "fields; examples in tasks/), the examples shared by Ray actors; prints a table and writes the figures and every "
     "answer as JSON.", _eval_options, _eval),
    (("quantize",), "post-training quantization (torchao) of an exported model folder",
     "Quantize a Hugging Face folder with torchao into a folder that from_pretrained and `llmray serve` load, and "
     "report held-out perplexity, weights on disk and generation tokens/s before and after (also saved as "
     "quant_report.json).", _quantize_options, _quantize),
    (("prune",), "structured (depth, width) or unstructured (magnitude, wanda; N:M) pruning of an exported model "
                 "folder, optionally with recovery training",
     "Prune a Hugging Face folder: depth drops the decoder layers that change the hidden state least on the "
     "held-out text, width keeps the most active MLP channels, attention heads and hidden channels (each a smaller "
     "model plain transformers loads); magnitude and wanda zero the lowest-scoring weights of each decoder Linear "
     "row at --sparsity or an N:M --pattern. --recover-steps then retrains on the stream (Minitron: prune, then "
     "distil). Reports held-out perplexity, parameters, non-zero share, weights on disk and tokens/s before, after "
     "pruning and after recovery (also saved as prune_report.json).",
     _prune_options, _prune),
    (("tune",), "a hyperparameter sweep (W&B sweep format) of whole training runs on Ray Tune",
     "Run the sweep file's trials with Ray Tune, each a full Ray Train + DeepSpeed run, logged to W&B as one sweep "
     "(offline without an API key). Rerunning a sweep that was interrupted resumes it. Ends with a leaderboard, "
     "results.csv/.json, sweep.png, and the best trial exported to best/ (under <storage>/<name>, or "
     "./sweeps/<name> and <storage>/<name>/results for an object store).", _tune_options, _tune),
    (("serve",), "serve exported models behind an OpenAI-compatible API (Ray Serve)",
     "Start Ray Serve on a local Ray (or the cluster in RAY_ADDRESS) with GET /v1/models, POST /v1/completions and "
     "/v1/chat/completions. For clusters and autoscaling use `serve run serve/config.yaml`.", _serve_options, _serve),
]
GROUPS = {"data": "corpus preparation", "tokenizer": "tokenizers", "vision": "vision-language models"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command named in `argv` gets its options (and imports its module)."""
    words = [a for a in (argv or []) if not a.startswith("-")]
    p = argparse.ArgumentParser(prog="llmray", description="Pretrain causal LMs with Ray Data, Ray Train and DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, help_, description, options, run in COMMANDS:
        parent = sub
        if len(path) == 2:
            if path[0] not in groups:
                groups[path[0]] = sub.add_parser(path[0], help=GROUPS[path[0]]).add_subparsers(
                    dest=f"{path[0]}_command", required=True)
            parent = groups[path[0]]
        cmd = parent.add_parser(path[-1], help=help_, description=description, formatter_class=_Help)
        if tuple(words[:len(path)]) == path:
            options(cmd)
        cmd.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from llmray import logs

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key, value in logs.no_progress_bars().items():  # before a command's options import transformers
        os.environ.setdefault(key, value)
    args = build_parser(argv).parse_args(argv)
    from llmray.errors import USER_ERRORS

    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"llmray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
