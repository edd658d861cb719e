"""One optimizer step of online RL (GRPO), as the training loop takes steps (`train.loop.train`).

A step that has no rollouts left first makes them: it takes `grad_accum_steps` micro-batches of prompts from the
stream, syncs the policy into the generator (checked), generates `group_size` completions per prompt (each seeded by
the prompt's id, `rollout.seed_of`), scores them (`rewards.py`) and turns the rewards into group-normalised
advantages. The batch is then trained on for `rl.updates` optimizer steps (the first on-policy; later ones clipped
against the log-probabilities it was sampled under), each over the same micro-batches, and then dropped.

Completions are not packed: a micro-batch is its prompts' completions, each prompt + completion padded after its
end to the longest. The loss is `objectives.grpo.policy_loss`; its per-token log-probabilities are taken at the
sampling temperature, as TRL takes them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from llmray import metric_names as M
from llmray.data.template import IGNORE_INDEX
from llmray.metric_names import CLIP_HIGH, CLIP_LOW, CLIP_REGION, KL
from llmray.objectives.grpo import STD_EPS, group_advantages, nanstd, policy_loss
from llmray.objectives.objective import reference_copy
from llmray.objectives.preference import token_log_probs
from llmray.objectives.rewards import Rewards
from llmray.objectives.rollout import Rollouts, seed_of
from llmray.ranks import across_ranks, gathered, mean_across_ranks
from llmray.recipe.schema import Recipe
from llmray.serve.sampling import Sampling

PARITY_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}  # rl.rollout.parity_tolerance's default


@dataclass
class Batch:
    """A micro-batch of completions, ready to train on."""

    input_ids: torch.Tensor  # (B, T) prompt + completion, padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # the completion's tokens, IGNORE_INDEX elsewhere
    advantages: torch.Tensor  # (B,)
    sampled: torch.Tensor  # (B, T) the generator's log-probability of each completion token (0 elsewhere)
    old: torch.Tensor | None = None  # the learner's before the first update (rl.updates > 1)
    reference: torch.Tensor | None = None  # the reference's (rl.beta > 0)

    @property
    def mask(self) -> torch.Tensor:
        return (self.labels != IGNORE_INDEX).float()


class RlSteps:
    """GRPO's optimizer steps on rollouts of the stream's prompts; `parts`: the metrics each step reports."""

    def __init__(self, recipe: Recipe, engine, device: torch.device, tokenizer, dtype: torch.dtype,
                 reference: torch.nn.Module | None = None, generators=None):
        self.recipe, self.rl, self.engine, self.device, self.tokenizer = recipe, recipe.rl, engine, device, tokenizer
        self.rewards = Rewards(self.rl.rewards)
        self.mode = recipe.reference
        self.reference = reference_copy(recipe, device, dtype, reference)
        tolerance = self.rl.rollout.parity_tolerance or PARITY_TOLERANCE.get(dtype, 5e-2)
        self.rollouts = Rollouts(recipe, dist.get_rank(), device, tolerance, generators)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batches: list[Batch] = []
        self.updates_left = 0
        self.rollout_metrics: dict[str, float] = {}
        self.samples: list = []
        self.data_wait = 0.0
        reward_parts = [m for name in self.rewards.names for m in (M.reward_of(name), M.reward_errors(name))]
        # what the loss reports, averaged over a step's micro-batches (KL only where the loss has the term)
        self.loss_parts = (CLIP_LOW, CLIP_HIGH, CLIP_REGION, M.ENTROPY, *((KL,) if self.rl.beta else ()))
        self.parts = (M.REWARD, M.REWARD_STD, M.ACCURACY, *reward_parts, M.COMPLETION_LENGTH, M.CLIPPED,
                      *self.loss_parts, M.SAMPLING_GAP, M.SAMPLING_GAP_MAX, M.SYNC_PARITY, M.GENERATOR_RETRIES,
                      M.GENERATE_S, M.SCORE_S, M.SYNC_S, M.TRAIN_S, M.ROLLOUT_TOKENS_PER_S)

    # ---- rollouts -------------------------------------------------------------------------------------------

    def make_rollouts(self, stream, state) -> bool:
        prompt_batches = []
        for _ in range(self.recipe.grad_accum_steps):
            started = time.perf_counter()
            batch = next(stream, None)
            self.data_wait += time.perf_counter() - started
            if batch is None:
                return False
            prompt_batches.append(batch)
        sync_s, retries_before = 0.0, self.rollouts.retries
        if self.rollouts.version != state.step:
            sync_s = self.rollouts.sync(self.engine, state.step)
        g, rl = self.rl.group_size, self.rl
        prompts, prompt_texts, samplings, fields, ids = [], [], [], [], []
        for batch in prompt_batches:
            for i in range(len(batch["input_ids"])):
                prompt = batch["input_ids"][i, :int(batch["prompt_length"][i])].tolist()
                text = self.tokenizer.decode(prompt, skip_special_tokens=False)  # what a user reward reads
                record = json.loads(batch["fields"][i])
                key = (int(batch["epoch"][i]), int(batch["piece"][i]), int(batch["sample"][i]))
                ids.append(list(key))
                for j in range(g):
                    prompts.append(prompt)
                    prompt_texts.append(text)
                    fields.append(record)
                    samplings.append(Sampling(max_tokens=rl.max_completion_tokens, temperature=rl.temperature,
                                              top_p=rl.top_p, top_k=rl.top_k, seed=seed_of(self.recipe.run.seed, *key, j)))
        started = time.perf_counter()
        rollouts = self.rollouts.generate(prompts, samplings)
        generate_s = time.perf_counter() - started
        generated = sum(len(r.tokens) for r in rollouts)

        started = time.perf_counter()
        texts = [self.tokenizer.decode(r.tokens, skip_special_tokens=True) for r in rollouts]
        scores = self.rewards.score(prompt_texts, texts, fields)
        for name, why in scores.first_error.items():
            print(f"[llmray] warning: reward {name} raised on {scores.errors[name]} of {len(texts)} completions at step "
                  f"{state.step} (scored 0): {why}", flush=True)
        score_s = time.perf_counter() - started

        rewards = torch.tensor(scores.total, dtype=torch.float32)
        advantages = self.advantages(rewards)
        per_batch = len(rollouts) // len(prompt_batches)
        self.batches = [self.collate(prompts[k:k + per_batch], rollouts[k:k + per_batch], advantages[k:k + per_batch])
                        for k in range(0, len(rollouts), per_batch)]
        self.add_reference_and_old()
        self.updates_left = rl.updates
        self.samples = ids
        correct = [scores.by_function[n] for n, r in zip(self.rewards.names, rl.rewards)
                   if r.kind in ("exact_match", "numeric")]
        self.rollout_metrics = {
            M.REWARD: float(torch.nanmean(rewards)), M.REWARD_STD: float(nanstd(rewards)),
            M.ACCURACY: float(np.mean(np.all(np.stack(correct) >= 1.0, axis=0))) if correct else float("nan"),
            **{M.reward_of(n): float(np.nanmean(v)) if not np.isnan(v).all() else float("nan")
               for n, v in scores.by_function.items()},
            **{M.reward_errors(n): float(v) for n, v in scores.errors.items()},
            M.COMPLETION_LENGTH: generated / len(rollouts),
            M.CLIPPED: float(np.mean([r.reason == "length" for r in rollouts])),
            M.SYNC_PARITY: self.rollouts.parity, M.GENERATOR_RETRIES: self.rollouts.retries - retries_before,
            M.GENERATE_S: generate_s, M.SCORE_S: score_s, M.SYNC_S: sync_s,
            M.ROLLOUT_TOKENS_PER_S: generated / max(generate_s, 1e-9)}
        return True

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Group-normalised; with scale "batch", over the std of every rank's rewards."""
        g, scale = self.rl.group_size, self.rl.scale_rewards
        if scale != "batch":
            return group_advantages(rewards, g, scale)
        scored = rewards[~torch.isnan(rewards)]
        n, total, squares = across_ranks([float(len(scored)), float(scored.sum()), float((scored ** 2).sum())])
        std = max((squares - total * total / n) / max(n - 1, 1), 0.0) ** 0.5
        return group_advantages(rewards, g, "none") / (std + STD_EPS)  # NaN rewards: advantage 0 either way

    def collate(self, prompts: list[list[int]], rollouts: list, advantages: torch.Tensor) -> Batch:
        width = max(len(p) + len(r.tokens) for p, r in zip(prompts, rollouts))
        n = len(prompts)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        sampled = torch.zeros((n, width), dtype=torch.float32)
        for i, (p, r) in enumerate(zip(prompts, rollouts)):
            end = len(p) + len(r.tokens)
            ids[i, :end] = torch.tensor(p + r.tokens)
            mask[i, :end] = 1
            labels[i, len(p):end] = torch.tensor(r.tokens, dtype=torch.long)
            sampled[i, len(p):end] = torch.tensor(r.logprobs, dtype=torch.float32)
        d = self.device
        return Batch(ids.to(d), mask.to(d), labels.to(d), advantages.to(d), sampled.to(d))

    def logps(self, model, batch: Batch, entropy: bool = False):
        """(B, T) log-probability of each completion token at the sampling temperature (0 elsewhere); with
        `entropy`, also the mean entropy of the distributions they were drawn from (a detached scalar)."""
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits / self.rl.temperature
        out = token_log_probs(logits, batch.labels)
        if not entropy:
            return out
        with torch.no_grad():
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            per_token = -(lp.exp() * lp).sum(-1)
            mask = batch.mask[:, 1:]
            return out, (per_token * mask).sum() / mask.sum().clamp(min=1.0)

    @torch.no_grad()
    def add_reference_and_old(self) -> None:
        for batch in self.batches:
            if self.rl.updates > 1:
                batch.old = self.logps(self.engine, batch)
            if self.mode == "copy":
                batch.reference = self.logps(self.reference, batch)
            elif self.mode == "adapters":
                with self.engine.module.disable_adapter():
                    batch.reference = self.logps(self.engine.module, batch)

    # ---- one optimizer step -----------------------------------------------------------------------------------

    def step(self, engine, stream, state, window) -> bool:
        """One optimizer step on the current rollouts (made first when none are left); False when the stream ended."""
        if self.updates_left == 0 and not self.make_rollouts(stream, state):
            return False
        rl, accum = self.rl, len(self.batches)
        first = self.updates_left == rl.updates
        (completion_tokens,) = across_ranks([float(sum(b.mask.sum() for b in self.batches))])
        normalizer = completion_tokens / (dist.get_world_size() * accum)  # dapo: the step's token mean, all ranks
        step_loss = torch.zeros((), device=self.device)
        parts = dict.fromkeys(self.loss_parts, 0.0)
        gap, gap_max = [], 0.0
        train_started = time.perf_counter()
        for batch in self.batches:
            logps, entropy = self.logps(engine, batch, entropy=True)
            old = batch.old if batch.old is not None else logps.detach()
            loss, got = policy_loss(logps, old, batch.reference, batch.advantages, batch.mask, loss_type=rl.loss,
                                    epsilon_low=rl.epsilon_low, epsilon_high=rl.clip_high, beta=rl.beta,
                                    max_completion_length=rl.max_completion_tokens, normalizer=normalizer)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float()
            for name, value in {**got, M.ENTROPY: entropy}.items():
                parts[name] += float(value) / accum
            if first:  # the gap between the sampler's and the learner's log-probabilities, before any update
                diff = ((batch.sampled - old.detach()).abs() * batch.mask)
                gap.append(float(diff.sum() / batch.mask.sum().clamp(min=1.0)))
                gap_max = max(gap_max, float(diff.max()))
        self.updates_left -= 1
        state.step += 1
        (sequence_tokens,) = across_ranks([float(sum(b.attention_mask.sum() for b in self.batches))])
        state.tokens += int(sequence_tokens)
        state.stream = stream.state_dict()  # the position after the prompts these rollouts answered
        metrics = dict(self.rollout_metrics)
        metrics.update(parts)
        metrics[M.TRAIN_S] = time.perf_counter() - train_started
        if first:
            metrics.update({M.SAMPLING_GAP: float(np.mean(gap)), M.SAMPLING_GAP_MAX: gap_max})
        else:  # later updates of the same rollouts: their generation was counted once
            metrics.update({M.GENERATE_S: 0.0, M.SCORE_S: 0.0, M.SYNC_S: 0.0, M.SAMPLING_GAP: 0.0,
                            M.SAMPLING_GAP_MAX: 0.0})
        if self.recipe.train.record_samples:  # the audit trail: every rank's prompts, the step's mean loss
            (mean_loss,) = mean_across_ranks([step_loss.item() / accum])
            state.trace.append({"step": state.step, "loss": mean_loss, "samples": gathered(self.samples),
                                "reward": metrics[M.REWARD]})
        window.add_step(step_loss / accum, {k: v for k, v in metrics.items() if k in self.parts}, tokens=sequence_tokens)
        window.data_wait += self.data_wait
        self.data_wait = 0.0
        return True
