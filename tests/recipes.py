"""The tiny recipe the training tests share: jobs/pretrain_tiny.yaml on the test corpus, shrunk to seconds."""

from llmray.config import load_recipe


def tiny(corpus, tmp_path, *overrides):
    return load_recipe("jobs/pretrain_tiny.yaml", [
        f"data.shards={corpus['shards']}", f"data.tokenizer={corpus['tokenizer']}", f"run.storage_path={tmp_path}",
        "data.seq_len=64", "model.hidden_size=64", "model.num_layers=2", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.warmup_steps=2", "train.eval_every=0", "train.sample_prompt=null",
        *overrides])
