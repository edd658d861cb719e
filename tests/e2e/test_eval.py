"""`llmray eval` on a model folder (Ray actors sharing the examples) and on a live `llmray serve` URL: the figures
are those computed directly with transformers, and the two targets agree."""

import math
from pathlib import Path

import pytest
import torch
from helpers import free_port, greedy_reference

from llmray.evals.run import evaluate
from llmray.evals.score import choice_texts
from llmray.evals.tasks import load_task

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
TASKS = [str(REPO / "tasks" / f) for f in ("stdlib_perplexity.yaml", "module_of.yaml", "py2to3.yaml", "stdlib_qa.yaml")]


def transformers_figures(model_dir):
    """Perplexity of the snippets and each choice question's best label, computed here with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def logprobs(ids):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)

    nll = tokens = 0
    for e in load_task(TASKS[0]).examples:
        ids = tok(e.prompt).input_ids
        lp = logprobs(ids)
        nll -= sum(lp[i - 1, t].item() for i, t in enumerate(ids) if i)
        tokens += len(ids) - 1
    choice = load_task(TASKS[1])
    best = []
    for e in choice.examples:
        scores = []
        for label in choice_texts(choice.spec):
            ctx, whole = tok(e.prompt).input_ids, tok(e.prompt + label).input_ids
            lp = logprobs(whole)
            scores.append(sum(lp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        best.append(choice.spec.choices[max(range(len(scores)), key=scores.__getitem__)])
    return math.exp(nll / tokens), best


def test_folder_and_served_url_give_the_figures_transformers_gives(model_dir, ray_cluster, tmp_path):
    from ray import serve

    from llmray.serve.app import build_app

    ppl, best = transformers_figures(model_dir)
    local = evaluate(str(model_dir), TASKS, workers=2, out=str(tmp_path / "local.json"))
    figures = local["tasks"]
    assert set(figures) == {"stdlib_perplexity", "module_of", "py2to3", "stdlib_qa"}
    assert figures["stdlib_perplexity"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert [a["answer"] for a in local["answers"]["module_of"]] == best
    assert figures["module_of"]["accuracy"] == pytest.approx(
        sum(b == e.target for b, e in zip(best, load_task(TASKS[1]).examples)) / len(best))
    greedy = greedy_reference(model_dir)
    qa = load_task(TASKS[3])
    assert [a["answer"] for a in local["answers"]["stdlib_qa"]] == [greedy(e.prompt, 12) for e in qa.examples]
    for name in ("py2to3", "stdlib_qa"):
        assert all(0.0 <= v <= 100.0 for k, v in figures[name].items() if k != "examples")
    assert (tmp_path / "local.json").is_file()

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": [{"path": str(model_dir), "name": "tiny"}]}, ray_actor_options={"num_cpus": 1}),
              name="llmray", route_prefix="/")
    try:
        remote = evaluate(f"http://127.0.0.1:{port}/v1", TASKS, out=None)
    finally:
        serve.shutdown()
    assert remote["tasks"]["stdlib_perplexity"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    for name in ("module_of", "py2to3", "stdlib_qa"):
        assert [a["answer"] for a in remote["answers"][name]] == [a["answer"] for a in local["answers"][name]], name


@pytest.mark.parametrize("stage", [2, 3])
def test_eval_tasks_while_training_report_what_llmray_eval_measures_after(zero_runs, tmp_path, stage):
    """An eval: block runs the tasks on the training ranks (split under ZeRO-2, in step under ZeRO-3); its final
    figures are those `llmray eval` gives on the exported checkpoint. The runs, 4 steps on 2 workers evaluating every
    2 steps, are tests/e2e/conftest.py's, shared with test_train.py's check that the ZeRO stages agree."""
    from llmray.export.folder import export
    from llmray.train.checkpoint import read_state

    summary = zero_runs[stage]
    assert set(summary.evals) >= {"eval/stdlib_perplexity/perplexity", "eval/module_of/accuracy", "eval/module_of/f1",
                                  "eval/stdlib_qa/exact_match", "eval/stdlib_qa/token_f1"}
    history = read_state(summary.checkpoint).history
    assert [h["step"] for h in history if "eval/module_of/accuracy" in h] == [2, 4]
    assert all(h["eval_s"] > 0 for h in history if "eval_s" in h)
    export(summary.checkpoint, str(tmp_path / "out"))
    after = evaluate(str(tmp_path / "out"), zero_runs["eval_tasks"], out=None)["tasks"]
    assert summary.evals["eval/stdlib_perplexity/perplexity"] == pytest.approx(after["stdlib_perplexity"]["perplexity"],
                                                                               rel=1e-4)
    for name, metric in (("module_of", "accuracy"), ("module_of", "f1"), ("stdlib_qa", "token_f1")):
        assert summary.evals[f"eval/{name}/{metric}"] == pytest.approx(after[name][metric]), (name, metric)
