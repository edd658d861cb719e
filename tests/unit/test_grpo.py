"""GRPO's arithmetic (llmray/objectives/grpo.py) against closed forms and TRL 1.16's GRPOTrainer."""

import tempfile

import pytest
import torch
from helpers import tiny_llama

from llmray.metric_names import CLIP_HIGH, CLIP_LOW, CLIP_REGION, KL
from llmray.objectives.grpo import group_advantages, policy_loss


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as TRL's nanstd
    assert torch.allclose(adv[:4], (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group that all scored the same teaches nothing
    assert torch.allclose(group_advantages(rewards, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    assert torch.allclose(group_advantages(rewards, 4, "batch"), (rewards - rewards.view(2, 4).mean(1).repeat_interleave(4))
                          / (rewards.std() + 1e-4))


def test_the_clipped_loss_on_hand_set_ratios():
    """One token per completion: ratio 1.5 with A > 0 is clipped to 1.2; ratio 0.5 with A < 0 to 0.8."""
    old = torch.zeros(2, 1)
    logps = torch.log(torch.tensor([[1.5], [0.5]]))
    loss, m = policy_loss(logps, old, None, torch.tensor([1.0, -1.0]), torch.ones(2, 1), loss_type="bnpo")
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert m[CLIP_HIGH].item() == 0.5 and m[CLIP_LOW].item() == 0.5 and m[CLIP_REGION].item() == 1.0
    ref = torch.log(torch.tensor([[1.0], [1.0]]))  # KL k3 of pi_ref/pi = r: r - log r - 1
    r = torch.tensor([1 / 1.5, 1 / 0.5])
    for kl_ratio, weight in ((False, 1.0), (True, torch.tensor([1.5, 0.5]))):  # weighted by the ratio pi / pi_old
        _, m = policy_loss(logps, old, ref, torch.tensor([1.0, -1.0]), torch.ones(2, 1), loss_type="bnpo", beta=0.1,
                           kl_ratio=kl_ratio)
        assert m[KL].item() == pytest.approx(((r - torch.log(r) - 1) * weight).mean().item(), rel=1e-6)


@pytest.fixture(scope="module")
def tiny(corpus):
    from llmray.data.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus["tokenizer"])
    return tok, tiny_llama(len(tok))


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.04), ("bnpo", 0.0), ("dr_grpo", 0.04), ("dapo", 0.04)])
def test_loss_and_metrics_equal_trls_grpo_trainer(tiny, loss_type, beta):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok, model = tiny
    g = torch.Generator().manual_seed(1)
    rows, prompt_len, completion_len = 6, 5, 7
    prompt_ids = torch.randint(3, len(tok), (rows, prompt_len), generator=g)
    completion_ids = torch.randint(3, len(tok), (rows, completion_len), generator=g)
    completion_mask = (torch.arange(completion_len) < torch.tensor([7, 5, 3, 7, 6, 1]).unsqueeze(1)).long()
    with torch.no_grad():  # the model's own per-token log-probabilities of the completions, as both sides take them
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1)).logits[:, prompt_len - 1:-1]
        logps = torch.log_softmax(logits, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    old = logps + 0.3 * torch.randn(logps.shape, generator=g)  # the sampler's: some ratios beyond the clip
    ref = logps + 0.1 * torch.randn(logps.shape, generator=g)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]), 3)
    normalizer = float(completion_mask.sum())
    ours, metrics = policy_loss(logps, old, ref if beta else None, advantages, completion_mask, loss_type=loss_type,
                                epsilon_low=0.2, epsilon_high=0.28, beta=beta, max_completion_length=completion_len,
                                normalizer=normalizer)

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to=[], loss_type=loss_type,
                      beta=0.0, epsilon=0.2, epsilon_high=0.28, max_completion_length=completion_len,
                      num_generations=3, per_device_train_batch_size=6)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          processing_class=tok, train_dataset=Dataset.from_list([{"prompt": "x"}] * 6))
    trainer.beta = beta  # after init: with beta > 0 TRL would load a reference by name; its log-probs are given here
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": torch.tensor(normalizer)}
    trainer.model.eval()  # eval: no division by gradient accumulation, which llmray's engine does itself
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    for name, value in metrics.items():
        assert abs(value.item() - logged[name]) < 1e-5, (name, value.item(), logged[name])
    assert (KL in metrics) == bool(beta) and logged[CLIP_REGION] > 0  # the clip is exercised


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_rewards_to_advantages_equal_trls_grpo_trainer(tiny, scale, monkeypatch):
    """TRL's _generate_and_score_completions, fed fixed completions (a rollout_func) and two reward functions that
    return fixed scores (None where a function does not score; a completion neither scores), against llmray's
    weighted sum (objectives/rewards.py) and group_advantages."""
    import sys

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from llmray.objectives.rewards import Rewards
    from llmray.recipe.schema import RewardSettings

    tok, model = tiny
    scores = {"a": [1.0, 0.0, None, 1.0, 0.5, 0.5, 0.5, 0.5], "b": [0.0, 1.0, None, 0.0, None, 1.0, 0.0, 1.0]}
    module = type(sys)("fixed_rewards")
    module.a = lambda completions, **kw: scores["a"][:len(completions)]
    module.b = lambda completions, **kw: scores["b"][:len(completions)]
    monkeypatch.setitem(sys.modules, "fixed_rewards", module)
    ours = Rewards([RewardSettings(kind="function", function="fixed_rewards:a"),
                    RewardSettings(kind="function", function="fixed_rewards:b", weight=0.5)])
    total = ours.score(["x"] * 8, ["c"] * 8, [{}] * 8).total
    mine = group_advantages(torch.tensor(total, dtype=torch.float32), 4, scale)

    def rollout(prompts, trainer):  # fixed completions, one per row
        return {"prompt_ids": [[5, 6, 7]] * len(prompts), "completion_ids": [[8 + i, 9, 10] for i in range(len(prompts))],
                "logprobs": [[-1.0] * 3] * len(prompts)}

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to=[], num_generations=4,
                      per_device_train_batch_size=8, scale_rewards=scale, reward_weights=[1.0, 0.5],
                      max_completion_length=3)
    trainer = GRPOTrainer(model=model, reward_funcs=[module.a, module.b], args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * 8), rollout_func=rollout)
    trainer.model.train()
    theirs = trainer._generate_and_score_completions([{"prompt": "x"}] * 8)["advantages"]
    assert torch.allclose(mine, theirs, atol=1e-6), (mine, theirs)
    assert mine[2] == 0 and (mine != 0).sum() >= 5  # the unscored completion teaches nothing; the others do
