import re
import subprocess
import sys

import pytest

from llmray.recipe.load import load_recipe, recipe_from_dict
from llmray.recipe.schema import RecipeError

BASE = {"data": {"shards": "s", "tokenizer": "t"}}


def recipe(*overrides):
    from llmray.recipe.load import apply_overrides

    return recipe_from_dict(apply_overrides({"data": dict(BASE["data"])}, list(overrides)))


def test_overrides_are_typed_and_nested():
    r = recipe("train.lr=1e-3", "train.zero_stage=3", "scaling.num_workers=4", "train.global_batch_size=64")
    assert r.train.lr == pytest.approx(1e-3)
    assert r.train.zero_stage == 3
    assert r.grad_accum_steps == 64 // (8 * 4)


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr: unknown key"),
    ("train.zero_stage=5", "train.zero_stage"),
    ("model.num_heads=3", "model.num_heads"),
    ("train.schedule=exp", "train.schedule"),
    ("scaling.num_workers=0", "scaling.num_workers"),
])
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        recipe(override)


def test_batch_arithmetic_must_divide():
    with pytest.raises(RecipeError, match=r"train\.global_batch_size=20 is not a multiple of .*= 16"):
        recipe("train.global_batch_size=20", "train.micro_batch_size=8", "scaling.num_workers=2")


def test_min_workers_keeps_the_global_batch_at_every_size_the_group_may_take():
    r = recipe("train.global_batch_size=48", "train.micro_batch_size=4", "scaling.num_workers=4",
               "scaling.min_workers=2", "scaling.max_failures=-1")
    assert r.grad_accum_steps == 3
    shrunk = r.at_world_size(3)
    assert shrunk.grad_accum_steps == 4 and shrunk.train.global_batch_size == 48 and r.scaling.num_workers == 4
    with pytest.raises(RecipeError, match=r"scaling\.min_workers=2: .* x 3 workers, a size the run may shrink to"):
        recipe("train.global_batch_size=32", "train.micro_batch_size=4", "scaling.num_workers=4",
               "scaling.min_workers=2", "scaling.max_failures=-1")
    with pytest.raises(RecipeError, match=r"scaling\.min_workers: .* scaling\.max_failures=0 forbids"):
        recipe("train.global_batch_size=48", "train.micro_batch_size=4", "scaling.num_workers=4", "scaling.min_workers=2")
    with pytest.raises(RecipeError, match=r"scaling\.min_workers=5 is more than scaling\.num_workers=4"):
        recipe("train.global_batch_size=48", "train.micro_batch_size=4", "scaling.num_workers=4",
               "scaling.min_workers=5", "scaling.max_failures=1")


def test_seq_len_beyond_positions():
    with pytest.raises(RecipeError, match=r"data\.seq_len=1024 is larger than model\.max_position_embeddings=512"):
        recipe("data.seq_len=1024")


def test_fp16_refused_on_cpu():
    with pytest.raises(RecipeError, match="fp16 needs scaling.use_gpu=true"):
        recipe("train.precision=fp16")


def test_missing_required_and_files(tmp_path):
    with pytest.raises(RecipeError, match="data.tokenizer: required key is missing"):
        recipe_from_dict({"data": {"shards": "x"}})
    with pytest.raises(RecipeError, match="recipe file .*nope.yaml does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_shipped_recipes_validate():
    r = load_recipe("jobs/pretrain_tiny.yaml", ["scaling.num_workers=1", "train.global_batch_size=32"])
    assert r.grad_accum_steps == 4


def test_deepspeed_config_follows_recipe():
    from llmray.train.zero import deepspeed_config

    r = recipe("train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true", "train.grad_clip=0.5",
               "train.deepspeed={gradient_clipping: 0.5, zero_optimization: {stage3_max_live_parameters: 1000, "
               "reduce_bucket_size: 1000}, activation_checkpointing: {cpu_checkpointing: true}}")
    c = deepspeed_config(r, "fp32")
    assert c["zero_optimization"]["stage"] == 3
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert c["zero_optimization"]["stage3_max_live_parameters"] == 1000  # raw JSON merged, not replaced
    assert c["zero_optimization"]["reduce_bucket_size"] == 1000  # llmray's own defaults may be retuned
    assert c["activation_checkpointing"] == {"cpu_checkpointing": True}  # and DeepSpeed features added
    assert c["gradient_clipping"] == 0.5  # a recipe-owned key set to the recipe's own value is accepted
    assert c["train_batch_size"] == c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"] * 2
    assert "torch_adam" not in c["optimizer"]["params"]  # offload takes DeepSpeed's CPU Adam


@pytest.mark.parametrize("raw, message", [
    ("{zero_optimization: {stage: 3}}", "train.deepspeed sets zero_optimization.stage=3 but train.zero_stage gives 2: "
                                        "set train.zero_stage instead"),
    ("{gradient_clipping: 0.5}", "sets gradient_clipping=0.5 but train.grad_clip gives 1.0"),
    ("{optimizer: {params: {lr: 0.1}}}", "sets optimizer.params.lr=0.1 but train.lr gives 0.0003"),
    ("{optimizer: {type: Adam}}", "sets optimizer.type='Adam' but llmray's AdamW gives 'AdamW'"),
    ("{optimizer: {params: {betas: [0.9, 0.999]}}}", "sets optimizer.params.betas=[0.9, 0.999] but train.betas gives"),
    ("{train_micro_batch_size_per_gpu: 4}", "but train.micro_batch_size gives 8"),
    ("{gradient_accumulation_steps: 4}", "but train.global_batch_size / (train.micro_batch_size x scaling.num_workers) "
                                         "gives 1"),
    ("{bf16: {enabled: true}}", "sets bf16.enabled=True but train.precision gives False"),
    ("{zero_optimization: {offload_optimizer: {device: cpu}}}", "but train.offload_optimizer gives 'none'"),
    ("{scheduler: {type: WarmupLR}}", "sets a scheduler, but the learning rate's course is the recipe's"),
])
def test_train_deepspeed_cannot_contradict_the_recipe(raw, message):
    from llmray.train.zero import deepspeed_config

    r = recipe(f"train.deepspeed={raw}")
    with pytest.raises(RecipeError, match=re.escape(message)):
        deepspeed_config(r, "fp32")


def test_cli_rejects_typo_in_one_line_without_starting_ray():
    out = subprocess.run([sys.executable, "-m", "llmray.cli", "train", "jobs/pretrain_tiny.yaml", "train.lrr=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["llmray: error: invalid recipe: train.lrr: unknown key"]


@pytest.mark.parametrize("cmd", [[], ["data", "shard"], ["tokenizer", "train"], ["train"], ["finetune"]])
def test_every_command_has_help(cmd):
    out = subprocess.run([sys.executable, "-m", "llmray.cli", *cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: llmray" in out.stdout


def test_cli_help_shows_the_defaults_the_library_uses(capsys):
    """Option defaults are read from the typed recipe and from the signatures the commands call, not restated."""
    from llmray.cli import main
    from llmray.quantize.folder import quantize_folder
    from llmray.recipe.schema import default
    from llmray.serve.app import ServeArgs

    def help_of(*cmd) -> str:
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        return " ".join(capsys.readouterr().out.split())

    quantize = help_of("quantize")
    assert f"--seq-len SEQ_LEN with --eval-data: tokens per sample (default: {default('data', 'seq_len')})" in quantize
    assert f"(default: {default('run', 'seed')})" in quantize and f"(default: {default('quant', 'group_size')})" in quantize
    import inspect
    assert f"(default: {inspect.signature(quantize_folder).parameters['eval_samples'].default})" in quantize
    serve = help_of("serve")
    assert f"one forward pass (default: {ServeArgs.model_fields['max_batch_size'].default})" in serve


def test_finetune_recipes():
    r = load_recipe("jobs/sft_tiny.yaml")
    assert r.finetune.method == "lora" and r.data.tokenizer == r.model.pretrained  # the model's own tokenizer
    q = load_recipe("jobs/sft_tiny.yaml", ["finetune.method=qlora"]).finetune
    assert q.adapters and (q.qlora.quant_type, q.qlora.double_quant) == ("nf4", True)
    with pytest.raises(RecipeError, match="finetune.method=qlora replicates its 4-bit base .* train.zero_stage=2"):
        load_recipe("jobs/sft_tiny.yaml", ["finetune.method=qlora", "train.zero_stage=3"])
    with pytest.raises(RecipeError, match="finetune.qlora.quant_type"):
        load_recipe("jobs/sft_tiny.yaml", ["finetune.method=qlora", "finetune.qlora.quant_type=int3"])
    with pytest.raises(RecipeError, match="finetune needs model.pretrained"):
        load_recipe("jobs/sft_tiny.yaml", ["model.pretrained=null", "data.tokenizer=t"])
    with pytest.raises(RecipeError, match="data.conversations is one corpus"):
        load_recipe("jobs/sft_tiny.yaml", ["data.sources=[{name: a, shards: s}]"])
    with pytest.raises(RecipeError, match="data.format"):
        load_recipe("jobs/sft_tiny.yaml", ["data.format=csv"])


def test_finetune_command_defaults_to_lora(tmp_path):
    """`llmray finetune` on a recipe without a finetune section fine-tunes with LoRA (shown by --dry-run)."""
    out = subprocess.run([sys.executable, "-m", "llmray.cli", "finetune", "jobs/pretrain_tiny.yaml", "model.pretrained=./m",
                          "data.conversations=./c", "data.shards=null", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "finetune:\n  method: lora\n" in out.stdout
