"""Online RL's parts without Ray: prompts read and streamed as rows, the rewards, the engine's rollouts (seeded,
their stop token kept, their log-probabilities those of a plain forward at the sampling temperature), and the weight
sync with its parity check (whole weights and LoRA adapters; a missed sync is caught)."""

import json
import sys

import numpy as np
import pytest
import torch

from llmray.data.chat import ChatDataError, read_conversations, shard_conversations
from llmray.data.pack import prompt_rows
from llmray.data.template import render
from llmray.data.tokenizer import load_tokenizer
from llmray.objectives.rewards import Rewards
from llmray.objectives.rollout import Generator, Rollouts, WeightSyncError, seed_of, trainer_probe, weight_update
from llmray.recipe.schema import Recipe, RecipeError, RewardSettings
from llmray.serve.sampling import Sampling


def rewards(*specs):
    return Rewards([RewardSettings(**s) for s in specs])


def test_built_in_rewards_and_their_weighted_sum():
    r = rewards({"kind": "exact_match", "pattern": r"answer: (.*)$"}, {"kind": "numeric", "weight": 2.0},
                {"kind": "regex", "pattern": r"^answer: ", "weight": 0.5})
    completions = ["answer: Paris.", "answer:  paris", "it is 12", "answer: 1,200", "nothing"]
    fields = [{"answer": "paris"}, {"answer": "Paris"}, {"answer": "12.0"}, {"answer": 1200}, {"answer": "3"}]
    got = r.score(["q"] * 5, completions, fields)
    np.testing.assert_array_equal(got.by_function["exact_match"], [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(got.by_function["numeric"], [0, 0, 1, 1, 0])  # the last number; "1,200" is 1200
    np.testing.assert_array_equal(got.by_function["regex"], [1, 1, 0, 1, 0])
    np.testing.assert_allclose(got.total, [1.5, 1.5, 2.0, 2.5, 0.0])
    assert got.errors == {"exact_match": 0, "numeric": 0, "regex": 0}


def flaky(prompts, completions, answer, **fields):
    """A user reward that raises on one kind of completion."""
    return [1.0 / (c != "boom") for c in completions]


def test_a_user_reward_that_raises_scores_zero_and_is_counted(monkeypatch):
    monkeypatch.setitem(sys.modules, "my_rewards", sys.modules[__name__])
    r = rewards({"kind": "function", "function": "my_rewards:flaky", "weight": 3.0})
    got = r.score(["q"] * 3, ["fine", "boom", "ok"], [{"answer": 1}] * 3)
    np.testing.assert_array_equal(got.total, [3.0, 0.0, 3.0])
    assert r.names == ["flaky"] and got.errors == {"flaky": 1} and "ZeroDivisionError" in got.first_error["flaky"]


def test_a_user_reward_that_does_not_import_is_named_before_training():
    with pytest.raises(RecipeError, match=r"rl.rewards\[0\].function: cannot import module 'no_such_module'"):
        rewards({"kind": "function", "function": "no_such_module:score"})
    with pytest.raises(RecipeError, match=r"module 'json' has no function 'nope'"):
        rewards({"kind": "function", "function": "json:nope"})


def recipe(model_dir, tokenizer, **rl):
    return Recipe(data={"conversations": "prompts.jsonl", "tokenizer": tokenizer},
                  model={"pretrained": str(model_dir)}, finetune={"method": rl.pop("method", "lora")},
                  train={"checkpoint_every": 10}, rl={"rewards": [{"kind": "exact_match"}], **rl})


def test_the_recipe_refuses_what_cannot_learn(model_dir, corpus):
    with pytest.raises(ValueError, match="a group of one always has advantage 0"):
        recipe(model_dir, corpus["tokenizer"], group_size=1)
    with pytest.raises(ValueError, match="which rl.beta=0 turns off"):
        recipe(model_dir, corpus["tokenizer"], reference="copy")
    with pytest.raises(ValueError, match="qlora is not built yet"):
        recipe(model_dir, corpus["tokenizer"], method="qlora")
    with pytest.raises(ValueError, match="rl.rollout.engine=vllm generates in actors of its own"):
        recipe(model_dir, corpus["tokenizer"], rollout={"engine": "vllm"})
    assert recipe(model_dir, corpus["tokenizer"]).reference == "none"
    assert recipe(model_dir, corpus["tokenizer"], beta=0.04).reference == "adapters"
    assert recipe(model_dir, corpus["tokenizer"], beta=0.04, method="full").reference == "copy"


def test_a_vllm_generator_says_what_it_lacks_where_it_cannot_run(model_dir, corpus):
    from llmray.objectives.vllm_rollout import VllmGenerator, VllmUnavailable

    # here: no vllm package (or, if one is installed, no GPU); either way one line naming the setting
    with pytest.raises(VllmUnavailable, match="rl.rollout.engine: vllm"):
        VllmGenerator(str(model_dir), corpus["tokenizer"], 8, "cpu")


def test_prompts_are_read_with_their_fields_and_bad_lines_named(tmp_path, corpus):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "What is 2 + 3?", "answer": "5"},
             {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7 + 1?"}],
              "answer": 8, "level": "easy"},
             {"prompt": "No answer here"},
             {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "answer": "x"},
             {"prompt": "   ", "answer": "1"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    read = list(read_conversations(str(path), kind="prompts", required=("answer",)))
    assert read[0][1] == {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "fields": {"answer": "5"}}
    assert read[1][1]["fields"] == {"answer": 8, "level": "easy"} and read[1][1]["prompt"][0]["role"] == "system"
    assert [(where, why) for where, _, why in read[2:]] == [
        (f"{path}:3", "field 'answer' is missing (a reward reads it)"),
        (f"{path}:4", "field 'prompt' ends in an assistant message: a prompt ends where the policy answers"),
        (f"{path}:5", "field 'prompt' is empty")]

    tok = load_tokenizer(corpus["tokenizer"])
    made = shard_conversations(str(path), str(tmp_path / "shards"), tok, 64, kind="prompts", required=("answer",))
    assert made.documents == 2 and len(made.skipped) == 3 and made.what == "prompts"
    assert "skipped " + f"{path}:3: field 'answer' is missing" in made.text()

    rows = prompt_rows(tok, [r for _, r, _ in read[:2]], 64)
    first = tok(render(tok, read[0][1]["prompt"], add_generation_prompt=True), add_special_tokens=False).input_ids
    assert rows["prompt_length"][0] == len(first) and rows["input_ids"][0, :len(first)].tolist() == first
    assert json.loads(rows["fields"][1]) == {"answer": 8, "level": "easy"}

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ChatDataError, match="holds preference pairs .* not prompts"):
        list(read_conversations(str(pairs), kind="prompts"))


@pytest.fixture(scope="module")
def generator(model_dir, corpus):
    return Generator(str(model_dir), corpus["tokenizer"], max_batch_size=3, device="cpu")


def test_rollouts_are_seeded_keep_their_stop_token_and_log_the_sampled_distribution(generator):
    engine = generator.engine
    prompt = engine.encode("def main():")
    samplings = [Sampling(max_tokens=12, temperature=0.7, seed=seed_of(1, 0, 5, i, j)) for i in range(2) for j in range(3)]
    first = generator.generate([prompt] * 6, samplings)
    again = generator.generate([prompt] * 6, samplings)
    assert [r.tokens for r in first] == [r.tokens for r in again]  # same seeds, same batches: same completions
    assert len({tuple(r.tokens) for r in first}) > 1  # different seeds sample differently
    for r in first:
        assert r.reason in ("stop", "length") and len(r.tokens) == len(r.logprobs)
        assert (r.tokens[-1] in engine.stops) == (r.reason == "stop")
        # each token's log-probability is the plain model's, at the sampling temperature
        ids = torch.tensor([prompt + r.tokens])
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1:-1] / 0.7
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r.tokens)[:, None])[:, 0]
        np.testing.assert_allclose(r.logprobs, want.numpy(), atol=1e-4)


class Trainer:
    """What the sync reads of a DeepSpeed engine: its module."""

    def __init__(self, module):
        self.module = module


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_sync_makes_the_generator_run_the_trained_weights_and_a_missed_one_is_caught(model_dir, corpus, method):
    from transformers import AutoModelForCausalLM

    from llmray.model.lora import with_lora

    r = recipe(model_dir, corpus["tokenizer"], method=method)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    if method == "lora":
        policy = with_lora(policy, r.finetune.lora)
    trainer = Trainer(policy.train())  # the probe is taken without dropout all the same
    rollouts = Rollouts(r, 0, torch.device("cpu"), tolerance=1e-4)
    rollouts.sync(trainer, 0)  # the untrained policy: the generator's base
    assert rollouts.parity < 1e-4

    torch.manual_seed(0)
    with torch.no_grad():  # a training step's worth of change
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    update = weight_update(trainer, method == "lora", 1)
    assert (update.lora is not None) == (method == "lora") and (update.full is not None) == (method == "full")
    with pytest.raises(WeightSyncError, match="weight sync check failed at step 0"):
        rollouts.check(trainer)  # the generator still runs the weights of step 0
    rollouts.sync(trainer, 1)
    assert rollouts.parity < 1e-4 and rollouts.local.version == 1
    np.testing.assert_allclose(rollouts.local.probe(), trainer_probe(trainer), atol=1e-4)


def test_top_k_draws_only_among_the_k_most_likely_tokens():
    from llmray.serve.sampling import sample

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    allowed = logits.topk(3, dim=-1).indices
    drawn = {row: set() for row in range(4)}
    for seed in range(200):
        gens = [torch.Generator().manual_seed(seed * 4 + row) for row in range(4)]
        tokens = sample(logits, [Sampling(temperature=1.0, top_k=3)] * 4, gens)
        for row, token in enumerate(tokens.tolist()):
            drawn[row].add(token)
    for row in range(4):
        assert drawn[row] == set(allowed[row].tolist())  # each of the three drawn, nothing else
    untruncated = {sample(logits[:1], [Sampling(temperature=1.0)], [torch.Generator().manual_seed(s)]).item()
                   for s in range(200)}
    assert len(untruncated) > 3  # without top_k the same row draws beyond its three most likely
