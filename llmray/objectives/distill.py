"""Knowledge distillation as a training objective: a frozen teacher, replicated on every rank (each holds a whole
copy: simple and exact for teachers that fit a device beside the student; a ZeRO-3-partitioned teacher is not
built), and the loss that mixes its soft targets with the student's LM loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmray import hub, storage
from llmray import metric_names as M
from llmray.recipe.schema import DistillSettings, RecipeError


def check_teacher(cfg: DistillSettings, student_vocab: int) -> None:
    """Before any worker starts: the teacher folder holds a causal LM with the student's vocabulary."""
    import json

    teacher = cfg.teacher
    if hub.is_hub_id(teacher):
        teacher = storage.local_folder(teacher, "distill.teacher", hub.TOKENIZER_FILES)
    fs, path = storage.resolve(teacher)
    try:
        with fs.open_input_stream(storage.join(path, "config.json")) as f:
            config = json.loads(f.read())
    except (OSError, ValueError):
        raise RecipeError(f"distill.teacher: {cfg.teacher} holds no readable config.json (a folder written by "
                          "`llmray export`, or any Hugging Face causal-LM folder)") from None
    archs = config.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise RecipeError(f"distill.teacher: {cfg.teacher} is not a causal LM (architectures: {archs or 'none'})")
    if config.get("vocab_size") != student_vocab:
        raise RecipeError(f"distill.teacher: its vocabulary has {config.get('vocab_size')} tokens, the student's "
                          f"{student_vocab}: teacher and student must share the tokenizer")


class Distillation:
    """The student's LM loss mixed with the teacher's soft targets (`distill_loss`); both parts are reported."""

    parts = (M.LM_LOSS, M.DISTILL_KL)

    def __init__(self, cfg: DistillSettings, device: torch.device, dtype: torch.dtype):
        from llmray.model.build import frozen

        self.cfg = cfg
        self.model = frozen(cfg.teacher, "distill.teacher", device, dtype)

    def loss(self, engine, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the loss to minimise, its reported parts) of one micro-batch."""
        out = engine(**inputs)
        with torch.no_grad():
            teacher_logits = self.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        total, kl = distill_loss(out.logits, teacher_logits, inputs["labels"], out.loss, self.cfg)
        return total, {M.LM_LOSS: out.loss.detach().float(), M.DISTILL_KL: kl.detach().float()}


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 lm_loss: torch.Tensor, cfg: DistillSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha * KL + (1 - alpha) * lm_loss, KL). KL(teacher || student) at each position whose next token is trained
    on, on distributions softened by the temperature T and scaled by T^2 (Hinton et al.: its gradients keep their
    size as T changes); with top_k, over the teacher's k most likely tokens, both renormalised there."""
    t = cfg.temperature
    keep = labels[:, 1:] != -100  # position i predicts token i + 1
    s = student_logits[:, :-1][keep].float() / t
    with torch.no_grad():
        tl = teacher_logits[:, :-1][keep].float() / t
        if cfg.top_k:
            tl, index = tl.topk(min(cfg.top_k, tl.shape[-1]), dim=-1)
        p_log = F.log_softmax(tl, -1)
    s_log = F.log_softmax(s.gather(-1, index) if cfg.top_k else s, -1)
    kl = (p_log.exp() * (p_log - s_log)).sum(-1).mean() * t * t
    return cfg.alpha * kl + (1 - cfg.alpha) * lm_loss, kl
