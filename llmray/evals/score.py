"""A task's examples answered by a backend (a model folder, a URL, or a training engine's module), and the
answers scored: what `llmray eval` and evaluation while training share."""

from __future__ import annotations

from llmray.evals import metrics
from llmray.evals.perplexity import perplexity
from llmray.evals.tasks import Example, Task, TaskSpec


def answer(backend, spec: TaskSpec, examples: list[Example]) -> list[dict]:
    """Per example: {"nll", "tokens"} (perplexity), {"answer"} (generate), {"scores", "answer"} (choice)."""
    prompts = [e.prompt for e in examples]
    if spec.type == "perplexity":
        return [{"nll": n, "tokens": t} for n, t in backend.nll(prompts)]
    if spec.type == "generate":
        return [{"answer": a} for a in backend.generate(prompts, spec.chat, spec.max_new_tokens)]
    pairs = [(p, c) for p in prompts for c in choice_texts(spec)]
    scores = backend.loglikelihoods(pairs, spec.chat)
    k = len(spec.choices)
    out = []
    for i in range(len(examples)):
        mine = scores[i * k:(i + 1) * k]
        out.append({"scores": mine, "answer": spec.choices[max(range(k), key=mine.__getitem__)]})
    return out


def choice_texts(spec: TaskSpec) -> list[str]:
    """What is scored after the prompt for each label: the label, after a space unless the prompt (or a chat's
    open assistant turn) already ends in whitespace."""
    return [c if spec.chat or (spec.prompt or "").endswith((" ", "\n")) else " " + c for c in spec.choices]


def score(task: Task, outputs: list[dict]) -> dict:
    spec, refs = task.spec, [e.target for e in task.examples]
    figures: dict = {"examples": len(task.examples)}
    if spec.type == "perplexity":
        nll, tokens = sum(o["nll"] for o in outputs), sum(o["tokens"] for o in outputs)
        loss = nll / max(tokens, 1)
        figures.update({"perplexity": perplexity(loss), "loss": loss, "tokens": tokens})
        return figures
    answers = [o["answer"] for o in outputs]
    for name in spec.metric_names:
        figures[name] = metrics.ON_TEXT[name](answers, refs)
    return figures
