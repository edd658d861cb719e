"""Distillation's loss and its checks, without Ray."""

import json

import pytest
import torch
import torch.nn.functional as F

from llmray.objectives.distill import check_teacher, distill_loss
from llmray.recipe.load import load_recipe
from llmray.recipe.schema import DistillSettings, RecipeError


def test_loss_is_alpha_kl_plus_the_rest_lm():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 3] = -100  # position 2 of row 0 is not trained on
    lm = torch.tensor(1.7)
    cfg = DistillSettings(teacher="x", alpha=0.3, temperature=2.0)
    total, kl = distill_loss(s, t, labels, lm, cfg)
    keep = labels[:, 1:] != -100
    expected = F.kl_div(F.log_softmax(s[:, :-1][keep] / 2, -1), F.log_softmax(t[:, :-1][keep] / 2, -1),
                        log_target=True, reduction="batchmean") * 4
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(total, 0.3 * expected + 0.7 * lm)
    assert distill_loss(t, t, labels, lm, cfg)[1].abs() < 1e-6  # a student equal to its teacher: no KL
    full = distill_loss(s, t, labels, lm, cfg.model_copy(update={"top_k": 11}))[1]
    torch.testing.assert_close(full, kl)  # top-k over the whole vocabulary is the full KL
    assert distill_loss(s, t, labels, lm, cfg.model_copy(update={"top_k": 3}))[1] != kl


def test_teacher_is_checked_before_anything_runs(tmp_path):
    cfg = DistillSettings(teacher=str(tmp_path / "none"))
    with pytest.raises(RecipeError, match="distill.teacher: .*none holds no readable config.json"):
        check_teacher(cfg, 100)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "vocab_size": 100}))
    with pytest.raises(RecipeError, match="is not a causal LM"):
        check_teacher(DistillSettings(teacher=str(tmp_path / "bert")), 100)
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 90}))
    with pytest.raises(RecipeError, match="its vocabulary has 90 tokens, the student's 100: teacher and student must"):
        check_teacher(DistillSettings(teacher=str(tmp_path / "lm")), 100)
    check_teacher(DistillSettings(teacher=str(tmp_path / "lm")), 90)


@pytest.mark.parametrize("override, key", [("distill.alpha=1.5", "distill.alpha"),
                                           ("distill.temperature=0", "distill.temperature")])
def test_alpha_and_temperature_out_of_range_name_the_key(override, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe("jobs/pretrain_tiny.yaml", ["distill.teacher=t", override])
