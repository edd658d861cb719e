"""Sweep files checked before Ray starts: W&B-format sweep files refused naming the parameter, each method mapped to
its Ray Tune search algorithm and scheduler, and the shipped sweep files load and dry-run."""

import math

import pytest
from helpers import REPO, sweep_file

from llmray.sweep.spec import SweepError, load_sweep


@pytest.mark.parametrize("change,message", [
    ({"parameters/train.lrr": {"values": [1e-3]}}, "parameters.train.lrr: 'lrr' is not a key of train"),
    ({"parameters/model.widht": {"values": [64]}}, "parameters.model.widht: 'widht' is not a key of model"),
    ({"parameters/train.lr": {"distribution": "gaussian", "mu": 0, "sigma": 1}},
     "distribution 'gaussian' is not one W&B defines (constant, categorical, int_uniform"),
    ({"parameters/train.global_batch_size": {"values": [8, 12]}},
     "parameters train.lr=0.01, quant.scheme=int8-dynamic, train.global_batch_size=12: invalid recipe: "
     "train.global_batch_size=12 is not a multiple of train.micro_batch_size * scaling.num_workers = 4 * 2 = 8"),
    ({"method": "random", "run_cap": 2,
      "parameters/train.global_batch_size": {"distribution": "int_uniform", "min": 8, "max": 64}},
     "parameters.train.global_batch_size: use `values`"),
    ({"parameters/train.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}},
     "parameters.train.lr: grid search needs `values`"),
    ({"method": "random"}, "run_cap: method random draws trials until run_cap"),
    ({"earl_terminate": {"type": "hyperband"}}, "earl_terminate: unknown key"),
    ({"metric": {"name": "val_pplx"}}, "metric.name: 'val_pplx' is not reported by trials"),
    ({"metric": {"name": "val_loss/code", "goal": "minimize"}},
     "metric.name=val_loss/code: the recipe's data.sources have no source 'code' (they have none"),
    ({"llmray/overrides": ["quant.method=none"]}, "parameters sweep quant.* but the recipe's quant.method is none"),
    ({"llmray/budget": {"steps": 8, "tokens": 100}}, "llmray.budget: give exactly one of steps or tokens"),
    ({"early_terminate": {"type": "hyperband", "min_iter": 2}},
     "early_terminate: hyperband compares trials while they train, but quant_ppl is known only when a trial ends"),
])
def test_bad_sweep_files_are_refused_naming_the_parameter(corpus, tmp_path, change, message):
    path = sweep_file(tmp_path, corpus, **change)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert message in str(err.value)
    assert not (tmp_path / "sweeps").exists()  # nothing started


def test_methods_map_to_ray_tune(corpus, tmp_path):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from llmray.sweep.run import concurrent_trials, search_space, tune_config

    grid = load_sweep(sweep_file(tmp_path, corpus, run_cap=1))
    assert grid.grid() == [{"train.lr": 1e-2, "quant.scheme": "int8-dynamic", "train.global_batch_size": 8}]
    config = tune_config(grid, concurrent=2)
    assert isinstance(config.search_alg, BasicVariantGenerator) and config.num_samples == 1
    assert config.search_alg.max_concurrent == 2  # Tune would ignore max_concurrent_trials for this generator
    bayes = load_sweep(sweep_file(tmp_path, corpus, method="bayes", run_cap=5, metric={"name": "val_ppl"}, **{
        "parameters/train.lr": {"distribution": "log_uniform", "min": -9.2, "max": -4.6},
        "early_terminate": {"type": "hyperband", "min_iter": 2000, "eta": 2}, "llmray/budget": {"tokens": 8192}}))
    config = tune_config(bayes, concurrent=3)
    assert isinstance(config.search_alg, ConcurrencyLimiter) and config.search_alg.max_concurrent == 3
    assert isinstance(config.search_alg.searcher, OptunaSearch) and config.num_samples == 5
    assert isinstance(config.scheduler, ASHAScheduler)
    assert config.scheduler._time_attr == "tokens" and config.scheduler._max_t == 8192
    lr = search_space(bayes)["train.lr"]
    assert lr.lower == pytest.approx(math.exp(-9.2)) and lr.upper == pytest.approx(math.exp(-4.6))  # W&B: exponents
    # "auto": whole trials the cluster holds, a CPU per worker plus one for tokenizing (at least one)
    assert concurrent_trials(bayes, {"CPU": 16}) == 5 and concurrent_trials(bayes, {"CPU": 2}) == 1
    trial = bayes.trial_recipe({"train.lr": 1e-3, "quant.scheme": "int8-dynamic", "train.global_batch_size": 8},
                               str(tmp_path), "t")
    assert trial.train.max_steps == 16 and trial.train.lr == 1e-3  # a token budget: 8192 / (8 x 64) steps


@pytest.mark.parametrize("path", sorted((REPO / "tune").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_load(path, capsys):
    from llmray.cli import main

    spec = load_sweep(path)
    assert spec.parameters and spec.llmray.budget.amount > 0
    main(["tune", str(path), "--dry-run"])
    printed = capsys.readouterr().out
    assert all(key in printed for key in spec.parameters)


def test_a_downstream_metric_must_name_a_task_and_metric_of_the_recipe(tmp_path):
    from llmray.sweep.spec import SweepError

    text = (REPO / "tune" / "sft_accuracy.yaml").read_text().replace("llmray:\n", f"llmray:\n  storage_path: {tmp_path}\n", 1)
    text = text.replace("  storage_path: ./sweeps\n", "")
    for metric, message in (("eval/nope/accuracy", "have no task 'nope'"),
                            ("eval/word_category/bleu", "task word_category reports accuracy, f1, exact_match")):
        path = tmp_path / "s.yaml"
        path.write_text(text.replace("eval/word_category/accuracy", metric))
        with pytest.raises(SweepError, match=message):
            load_sweep(path)


def test_the_size_trade_off_plot_marks_the_trials_nothing_beats_on_both(tmp_path):
    from llmray.sweep.results import pareto_front, plot

    points = [(3.0, 50.0), (1.0, 90.0), (2.0, 95.0), (2.5, 60.0), (4.0, 55.0)]
    assert pareto_front(points) == [(1.0, 90.0), (2.5, 60.0), (3.0, 50.0)]
    assert pareto_front([(x, -y) for x, y in points], sign=-1) == [(1.0, -90.0), (2.5, -60.0), (3.0, -50.0)]
    spec = load_sweep(REPO / "tune" / "prune_quant.yaml")
    rows = [{"prune.intermediate_size": 128 * (i % 3 + 1), "distill.alpha": 1.0, "quant.scheme": "int8-dynamic-int4",
             "quant_ppl": y, "quant_weights_bytes": x * 1e6} for i, (x, y) in enumerate(points)]
    assert plot(spec, rows, tmp_path).is_file()
    assert plot(spec, [{k: v for k, v in r.items() if k != "quant_weights_bytes"} for r in rows], tmp_path).is_file()


def test_a_blend_sweeps_on_one_sources_validation_loss(corpus, tmp_path):
    from helpers import SWEEP_SMALL

    blend = (f"data.sources=[{{name: web, shards: {corpus['shards']}}}, "
             f"{{name: code, shards: {corpus['shards']}, weight: 0.5}}]")
    path = sweep_file(tmp_path, corpus, **{
        "metric": {"name": "val_loss/code", "goal": "minimize"}, "parameters/quant.scheme": None,
        "llmray/overrides": ["data.shards=null", blend, f"data.tokenizer={corpus['tokenizer']}",
                             *(o for o in SWEEP_SMALL if not o.startswith("quant."))]})
    assert load_sweep(path).metric.name == "val_loss/code"


def test_trials_get_the_recipe_with_the_drivers_paths(monkeypatch, tmp_path):
    """Each trial runs in its own folder: the recipe file and its local paths are resolved in the driver's."""
    import yaml

    driver = tmp_path / "driver"
    for folder in ("shards", "model", "jobs", "tune"):
        (driver / folder).mkdir(parents=True)
    (driver / "jobs" / "r.yaml").write_text(yaml.safe_dump({
        "data": {"shards": "./shards"}, "model": {"pretrained": "model"}, "distill": {"teacher": "./model"}}))
    (driver / "tune" / "s.yaml").write_text(yaml.safe_dump({
        "name": "paths", "method": "grid", "metric": {"name": "val_ppl", "goal": "minimize"},
        "parameters": {"train.lr": {"values": [1e-3]}},
        "llmray": {"recipe": "jobs/r.yaml", "budget": {"steps": 2}, "storage_path": str(tmp_path / "sweeps")}}))
    monkeypatch.chdir(driver)
    spec = load_sweep("tune/s.yaml")
    assert spec.llmray.recipe == str(driver / "jobs" / "r.yaml")
    base = spec.base_raw()
    monkeypatch.chdir(tmp_path)  # where a trial runs
    trial = spec.trial_recipe({"train.lr": 1e-3}, str(tmp_path / "trials"), "t", base)
    assert trial.data.shards == str(driver / "shards")
    assert trial.model.pretrained == trial.distill.teacher == trial.data.tokenizer == str(driver / "model")


def test_trials_are_ranked_by_a_downstream_metric_and_the_leaderboard_shows_it(tmp_path):
    """A sweep on eval/<task>/<metric> (not one of the always-shown figures) ranks its trials by it, best first."""
    from ray.tune import Result

    from llmray.sweep.results import leaderboard, trial_rows

    text = (REPO / "tune" / "sft_accuracy.yaml").read_text().replace("  storage_path: ./sweeps\n",
                                                                      f"  storage_path: {tmp_path}\n")
    path = tmp_path / "s.yaml"
    path.write_text(text)
    spec = load_sweep(path)
    name = spec.metric.name
    grid = [Result(metrics={name: acc, "completed": True, "trial_id": f"t{i}", "step": 10,
                            "config": {"train.lr": lr, "finetune.lora.r": 8}}, checkpoint=None, error=None,
                   path=str(tmp_path / f"t{i}")) for i, (acc, lr) in enumerate([(0.25, 1e-3), (0.75, 3e-3), (0.5, 1e-4)])]
    rows = trial_rows(spec, grid)
    assert [r[name] for r in rows] == [0.75, 0.5, 0.25] and rows[0]["trial"] == "t1"
    assert name in leaderboard(spec, rows)


def test_trials_are_ranked_best_first_for_a_metric_to_minimize_failed_ones_last(corpus, tmp_path):
    """quant_ppl, minimized: the lowest first, a trial that failed (no metric) after every one that reported."""
    from ray.tune import Result

    from llmray.sweep.results import trial_rows

    spec = load_sweep(sweep_file(tmp_path, corpus))
    grid = [Result(metrics={"quant_ppl": ppl, "completed": True, "trial_id": f"t{i}", "step": 8,
                            "config": {"train.lr": lr}}, checkpoint=None, error=None, path=str(tmp_path / f"t{i}"))
            for i, (ppl, lr) in enumerate([(30.0, 1e-2), (20.0, 3e-3), (25.0, 1e-3)])]
    grid.insert(1, Result(metrics={"trial_id": "t9", "config": {"train.lr": 1e-4}}, checkpoint=None,
                          error=RuntimeError("boom"), path=str(tmp_path / "t9")))
    rows = trial_rows(spec, grid)
    assert [r["quant_ppl"] for r in rows[:3]] == [20.0, 25.0, 30.0] and rows[0]["trial"] == "t1"
    assert rows[3]["status"] == "failed" and rows[3]["train.lr"] == 1e-4
