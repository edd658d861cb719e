"""Every metric a run reports, named once: the training loop writes them; the summary, W&B, Tune and the
sweep's leaderboard read them."""

STEP = "step"
TOKENS = "tokens"
LOSS = "loss"  # mean training loss over the steps since the last report
LM_LOSS = "lm_loss"  # with distillation: the next-token loss part of `loss`
DISTILL_KL = "distill_kl"  # with distillation: the KL(teacher || student) part of `loss` (times T^2)
# With preference tuning, TRL's names: the implicit rewards beta * (policy - reference) log-probability of each
# side (SimPO: beta * its length-averaged log-probability), the share of pairs ranked right, their mean margin, and
# the policy's summed log-probabilities of each side.
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_ACCURACIES = "rewards/accuracies"
REWARDS_MARGINS = "rewards/margins"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
PREFERENCE = (REWARDS_CHOSEN, REWARDS_REJECTED, REWARDS_ACCURACIES, REWARDS_MARGINS, LOGPS_CHOSEN, LOGPS_REJECTED)
# With online RL (GRPO), TRL's names where it has them: the completions' reward (the weighted sum of the reward
# functions, over the completions some function scored; its std), each function's mean and how many completions it
# raised on, the
# share every correctness reward (exact_match, numeric) scores 1, completion length and the share cut at
# rl.max_completion_tokens, the loss's KL and clipped shares, the policy's entropy on the completions, the gap between
# the generator's and the learner's log-probabilities of the sampled tokens, the last weight sync's parity check,
# and where a step's time goes.
REWARD = "reward"
REWARD_STD = "reward_std"
ACCURACY = "accuracy"
COMPLETION_LENGTH = "completions/mean_length"
CLIPPED = "completions/clipped_ratio"
KL = "kl"
CLIP_LOW, CLIP_HIGH, CLIP_REGION = "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"
ENTROPY = "entropy"
SAMPLING_GAP = "sampling/sampling_logp_difference/mean"
SAMPLING_GAP_MAX = "sampling/sampling_logp_difference/max"
SYNC_PARITY = "sync/parity_max_diff"
GENERATOR_RETRIES = "sync/generator_retries"  # calls to a lost generator actor, tried again while Ray restarted it
GENERATE_S, SCORE_S, SYNC_S, TRAIN_S = "time/generate_s", "time/score_s", "time/sync_s", "time/train_s"
ROLLOUT_TOKENS_PER_S = "rollout_tokens_per_s"


def reward_of(name: str) -> str:
    """One reward function's mean score, e.g. rewards/exact_match/mean."""
    return f"rewards/{name}/mean"


def reward_errors(name: str) -> str:
    """Completions one reward function raised on (scored 0) in a step."""
    return f"rewards/{name}/errors"


LR = "lr"
GRAD_NORM = "grad_norm"
VAL_LOSS = "val_loss"
VAL_PPL = "val_ppl"
TOKENS_PER_S = "tokens_per_s"
TOKENS_PER_S_PER_WORKER = "tokens_per_s_per_worker"
STEP_TIME_S = "step_time_s"
DATA_WAIT_SHARE = "data_wait_share"
MFU = "mfu"
PEAK_MEMORY_GB = "peak_memory_gb"  # the largest of any worker's: GPU memory allocated on a GPU, else process RSS
PEAK_HOST_MEMORY_GB = "peak_host_memory_gb"  # on GPUs: the largest of any worker's process RSS
SAMPLE = "sample"  # a generated text, at the end of a run

# What only the end of a quantized run knows: the quantized export measured on the run's held-out samples.
QUANT_PPL = "quant_ppl"
QUANT_LOSS = "quant_loss"
QUANT_WEIGHTS_BYTES = "quant_weights_bytes"
QUANT_SIZE_RATIO = "quant_size_ratio"
QUANT_TOKENS_PER_S = "quant_tokens_per_s"


EVAL_S = "eval_s"  # seconds the training ranks spent on a recipe's eval tasks at this report
EVAL_PREFIX = "eval/"


def eval_metric(task: str, metric: str) -> str:
    """A recipe eval task's figure, e.g. eval/word_category/accuracy."""
    return f"{EVAL_PREFIX}{task}/{metric}"


def validation(metric: str) -> str:
    """A metric measured on the held-out samples, e.g. val_rewards/accuracies."""
    return f"val_{metric}"


def per_source(metric: str, source: str) -> str:
    """A metric of one source of a blend, e.g. val_loss/code."""
    return f"{metric}/{source}"


RL_WHILE_TRAINING = (REWARD, ACCURACY)  # what an RL run adds to the figures a sweep may rank trials on
WHILE_TRAINING = (LOSS, VAL_LOSS, VAL_PPL, TOKENS_PER_S, MFU, *RL_WHILE_TRAINING)
AT_THE_END = (QUANT_PPL, QUANT_LOSS, QUANT_WEIGHTS_BYTES, QUANT_SIZE_RATIO, QUANT_TOKENS_PER_S)
