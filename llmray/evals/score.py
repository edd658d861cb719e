"""A task's examples answered by a backend (a model folder, a URL, or a training engine's module), and the
answers scored: what `llmray eval` and evaluation while training share."""

from __future__ import annotations

from llmray.evals import metrics
from llmray.evals.perplexity import perplexity
from llmray.evals.tasks import Task, TaskError, TaskSpec


def answer(backend, task: Task) -> list[dict]:
    """Per example of `task` (or the share of its examples it holds): {"nll", "tokens"} (perplexity), {"answer"}
    (generate), {"scores", "answer"} (choice)."""
    spec, examples = task.spec, task.examples
    check_fits(backend, task)
    prompts = [e.prompt for e in examples]
    pictures = [e.image for e in examples] if spec.image else None
    if spec.type == "perplexity":
        return [{"nll": n, "tokens": t} for n, t in backend.nll(prompts)]
    if spec.type == "generate":
        return [{"answer": a} for a in backend.generate(prompts, spec.chat, spec.max_new_tokens, pictures)]
    labels = choice_texts(spec)
    pairs = [(p, c) for p in prompts for c in labels]
    scores = backend.loglikelihoods(pairs, spec.chat, [i for i in pictures for _ in labels] if pictures else None)
    k = len(spec.choices)
    out = []
    for i in range(len(examples)):
        mine = scores[i * k:(i + 1) * k]
        out.append({"scores": mine, "answer": spec.choices[max(range(k), key=mine.__getitem__)]})
    return out


def check_fits(backend, task: Task) -> None:
    """An image task needs a model that takes images, and a text task one that does not; an endpoint does not say
    (`takes_images` None): its server answers what it cannot take with an error."""
    if backend.takes_images is None or backend.takes_images == (task.spec.image is not None):
        return
    if backend.takes_images:
        raise TaskError(f"task {task.path} is a text task (no image field) and the model is a vision-language model: "
                        "give its lines an image (image: FIELD)")
    raise TaskError(f"task {task.path} is an image task (image: {task.spec.image}) and the model is a text-only model "
                    "(its config has no vision_config): evaluate a vision-language model folder")


def choice_texts(spec: TaskSpec) -> list[str]:
    """What is scored after the prompt for each label: the label, after a space unless the prompt (or a chat's
    open assistant turn) already ends in whitespace."""
    return [c if spec.chat or (spec.prompt or "").endswith((" ", "\n")) else " " + c for c in spec.choices]


def score(task: Task, outputs: list[dict]) -> dict:
    spec, refs = task.spec, [e.target for e in task.examples]  # a generate task's: a list where several
    figures: dict = {"examples": len(task.examples)}
    if spec.type == "perplexity":
        nll, tokens = sum(o["nll"] for o in outputs), sum(o["tokens"] for o in outputs)
        loss = nll / max(tokens, 1)
        figures.update({"perplexity": perplexity(loss), "loss": loss, "tokens": tokens})
        return figures
    answers = [o["answer"] for o in outputs]
    for name in task.metric_names:
        figures[name] = metrics.ON_TEXT[name](answers, refs)
    return figures
