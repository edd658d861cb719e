"""`llmray eval`'s task files, its metrics, and what an endpoint without logprobs is told; no Ray."""

import json
from pathlib import Path

import pytest
from helpers import json_server

from llmray.evals import metrics
from llmray.evals.backends import BackendError, Endpoint
from llmray.evals.tasks import TaskError, load_task

REPO = Path(__file__).resolve().parents[2]


def task(tmp_path, spec: str, lines: list[dict] | str):
    (tmp_path / "d.jsonl").write_text(lines if isinstance(lines, str) else "".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "t.yaml").write_text(spec)
    return tmp_path / "t.yaml"


CHOICE = "type: choice\ndata: d.jsonl\ninput: q\ntarget: a\nchoices: [pos, neg]\n"


@pytest.mark.parametrize("spec, lines, message", [
    (CHOICE, [{"q": "x", "a": "pos"}, {"q": "y"}], r"d.jsonl:2: field 'a' is missing"),
    (CHOICE, [{"q": "x", "a": "maybe"}], r"d.jsonl:1: field 'a': 'maybe' is not among the choices pos, neg"),
    (CHOICE.replace("[pos, neg]", "[yes, no]"), [], r"choices: YAML reads unquoted yes/no"),
    (CHOICE, "", r"data file .*d.jsonl is empty"),
    (CHOICE, "{nope\n", r"d.jsonl:1: not valid JSON"),
    (CHOICE.replace("choices: [pos, neg]\n", ""), [{"q": "x", "a": "pos"}], r"choices: a choice task needs its labels"),
    ("type: generate\ndata: d.jsonl\ninput: q\n", [{"q": "x"}], r"target: a generate task needs"),
    ("type: choice\ndata: d.jsonl\ninput: q\ntarget: a\nchoices: [y]\nmetrics: [bleu]\n", [{"q": "x", "a": "y"}],
     r"metrics: bleu not available for a choice task"),
    ("type: generate\ndata: d.jsonl\ninput: q\ntarget: a\nprompt: '{q} {context}'\n", [{"q": "x", "a": "y"}],
     r"d.jsonl:1: field 'context' is missing"),
    ("type: perplexity\ndata: nowhere.jsonl\n", [], r"data: .*nowhere.jsonl does not exist"),
    ("type: ranking\ndata: d.jsonl\n", [], r"type"),
])
def test_bad_task_files_and_lines_are_named(tmp_path, spec, lines, message):
    with pytest.raises(TaskError, match=message):
        load_task(task(tmp_path, spec, lines))


def test_shipped_tasks_load():
    loaded = [load_task(p) for p in sorted((REPO / "tasks").glob("*.yaml"))]
    assert {t.spec.type for t in loaded} == {"perplexity", "generate", "choice"}
    shown = {m for t in loaded for m in t.spec.metric_names}
    assert shown >= {"perplexity", "bleu", "chrf", "accuracy", "f1", "exact_match", "token_f1"}, "every metric works"


def test_metrics_on_known_answers():
    import sacrebleu

    assert metrics.exact_match(["The Paris.", "london"], ["paris", "Berlin"]) == 0.5
    assert metrics.token_f1(["the number of items"], ["number of items in it"]) == pytest.approx(2 * 1 * 0.6 / 1.6)
    hyps, refs = ["print(x, y)", "k in d"], ["print(x, y)", "k in dict"]
    assert metrics.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert metrics.chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    # macro-F1: label a: tp 1, fp 1, fn 0 -> 2/3; label b: tp 0, fn 1 -> 0
    assert metrics.macro_f1(["a", "a"], ["a", "b"]) == pytest.approx((2 / 3 + 0) / 2)
    assert metrics.accuracy(["a", "a"], ["a", "b"]) == 0.5


def test_endpoint_without_logprobs_is_told_so():
    # an OpenAI-style server that ignores logprobs and echo
    with json_server({"choices": [{"index": 0, "text": "x", "logprobs": None}]}) as (url, _):
        endpoint = Endpoint(f"{url}/v1", model="m")
        assert endpoint.generate(["hi"], chat=False, max_new_tokens=2) == ["x"]
        with pytest.raises(BackendError, match="returned no logprobs: log-likelihood tasks"):
            endpoint.loglikelihoods([("a", " b")], chat=False)


def test_the_demo_task_file_holds_the_demos_held_out_prompts():
    """tasks/data/word_category.jsonl is what jobs/chat_task.py holds out of the fine-tuning demo's training."""
    import sys

    sys.path.insert(0, str(REPO / "jobs"))
    from chat_task import held_out_task_lines

    shipped = [json.loads(line) for line in (REPO / "tasks/data/word_category.jsonl").read_text().splitlines()]
    assert shipped == held_out_task_lines()
