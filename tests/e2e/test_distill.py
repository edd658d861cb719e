"""Distillation on the real spine: a smaller student learns from a frozen teacher on every rank; the loss's parts
are reported; a run started from the step-4 checkpoint of one that ran through trains on exactly the samples, with
exactly the losses, of the rest of that run."""

import numpy as np
import pytest
from helpers import tiny

from llmray.recipe.schema import RecipeError
from llmray.train.checkpoint import list_checkpoints, read_state
from llmray.train.trainer import fit

pytestmark = pytest.mark.ray


def student(corpus, model_dir, tmp_path, name, *overrides):
    return tiny(corpus, tmp_path, f"run.name={name}", "model.num_layers=1", f"distill.teacher={model_dir}",
                "distill.alpha=0.7", "distill.temperature=2.0", "train.log_every=2", "train.checkpoint_every=4",
                "train.record_samples=true", "scaling.num_workers=2", "train.schedule=constant", *overrides)


def test_distilled_student_reports_its_loss_parts_and_resumes_exactly(corpus, model_dir, ray_cluster, tmp_path):
    through = fit(student(corpus, model_dir, tmp_path / "a", "through", "train.max_steps=8"))
    state = read_state(through.checkpoint)
    for h in state.history:  # the reported loss is alpha * KL + (1 - alpha) * LM loss
        assert h["loss"] == pytest.approx(0.7 * h["distill_kl"] + 0.3 * h["lm_loss"], rel=1e-5)
    assert state.history[-1]["distill_kl"] < state.history[0]["distill_kl"], "the student did not move to its teacher"

    # Stopped at step 4 and continued: a new run from the through run's step-4 checkpoint (two runs where three were:
    # continuing the same run by rerunning it is tested in test_resume.py).
    (step, at_4), _ = list_checkpoints(through.run_dir)
    assert step == 4
    continued = fit(student(corpus, model_dir, tmp_path / "b", "continued", "train.max_steps=8"), resume_from=at_4)
    again = read_state(continued.checkpoint)
    assert [r["step"] for r in again.resumes] == [4]
    assert [s["samples"] for s in again.trace] == [s["samples"] for s in state.trace]
    np.testing.assert_allclose([s["loss"] for s in again.trace], [s["loss"] for s in state.trace], rtol=0, atol=1e-6)


def test_a_teacher_with_another_vocabulary_is_refused_before_ray(corpus, model_dir, tmp_path):
    with pytest.raises(RecipeError, match="its vocabulary has .* tokens, the student's 999"):
        fit(student(corpus, model_dir, tmp_path, "mismatch", "model.extra={vocab_size: 999}"))
