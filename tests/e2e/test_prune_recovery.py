"""Pruning with recovery on the real spine: a trained, exported model is pruned and retrained on the recipe its
export recorded. Unstructured pruning keeps its zeros through training (under ZeRO-3, whose partitions the mask
must survive); width pruning distils from the unpruned model. Each recovers perplexity the pruning lost."""

import json

import pytest
import torch
from helpers import tiny

from llmray.export.folder import export
from llmray.prune.recover import recover
from llmray.recipe.schema import PruneSettings
from llmray.train.checkpoint import read_state
from llmray.train.trainer import fit

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def trained(corpus, ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    summary = fit(tiny(corpus, tmp, "run.name=src", "train.max_steps=8", "train.lr=3e-3", "scaling.num_workers=2"))
    export(summary.checkpoint, str(tmp / "exported"))
    return str(tmp / "exported")


def weights(folder):
    from transformers import AutoModelForCausalLM

    return {k: v for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items() if ".layers." in k
            and "proj" in k}


def test_magnitude_recovery_keeps_the_zeros_under_zero3(trained, tmp_path):
    spec = PruneSettings(method="magnitude", sparsity=0.5, calibration_samples=8)
    report = recover(trained, str(tmp_path / "sparse"), spec, steps=4, overrides=["train.zero_stage=3"])
    pruned, recovered = weights(report["recovery"]["run"] + "/pruned"), weights(str(tmp_path / "sparse"))
    for name, w in pruned.items():
        assert torch.equal(recovered[name][w == 0], torch.zeros_like(recovered[name][w == 0])), name
        assert not torch.equal(recovered[name], w), f"{name} did not train"
    assert report["after"]["nonzero_share"] == pytest.approx(report["pruned"]["nonzero_share"], abs=1e-3)
    assert report["after"]["ppl"] < report["pruned"]["ppl"], "recovery did not win back perplexity"
    assert report["recovery"]["how"] == "retrained with the zeros held"
    lineage = json.loads((tmp_path / "sparse" / "llmray_export.json").read_text())
    assert lineage["prune"]["recovery"]["steps"] == 4 and lineage["prune"]["spec"]["sparsity"] == 0.5


def test_width_recovery_distils_from_the_unpruned_model(trained, tmp_path):
    spec = PruneSettings(method="width", hidden_size=48, intermediate_size=128, calibration_samples=8)
    report = recover(trained, str(tmp_path / "narrow"), spec, steps=4)
    assert report["after"]["parameters"] < report["before"]["parameters"]
    assert report["recovery"]["how"] == "distilled from the unpruned model"
    history = read_state(report["recovery"]["checkpoint"]).history
    assert all(h["loss"] == pytest.approx(h["distill_kl"], rel=1e-5) for h in history), "alpha 1: the KL alone"
    assert report["after"]["ppl"] < report["pruned"]["ppl"], "recovery did not win back perplexity"
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(tmp_path / "narrow")).hidden_size == 48
