"""`llmray prune` on a tiny exported model: depth and width make a smaller model transformers loads (width removing
exactly the heads and channels that do nothing), magnitude and wanda zero the share or pattern asked, bad arguments
are refused with nothing written, and reports chain."""

import json
import shutil

import pytest
import torch

from llmray.data.split import HeldOut
from llmray.model import lineage
from llmray.prune import width
from llmray.prune.depth import block_influence
from llmray.prune.folder import PruneError, check_spec, prune_folder
from llmray.recipe.schema import PruneSettings


@pytest.fixture(scope="module")
def exported(corpus, model_dir, tmp_path_factory):
    """The tiny model as `llmray export` leaves it: with its held-out set recorded."""
    folder = tmp_path_factory.mktemp("prune") / "model"
    shutil.copytree(model_dir, folder)
    lineage.write(folder, lineage.record_export(HeldOut(corpus["shards"], 0.2, 64), step=1))
    return folder


FEW = {"calibration_samples": 8}


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def test_depth_drops_the_least_influential_layer_into_a_smaller_model(exported, tmp_path):
    report = prune_folder(str(exported), str(tmp_path / "out"), PruneSettings(method="depth", drop_layers=1, **FEW))
    influence = report["block_influence"]
    assert report["dropped_layers"] == [min(range(len(influence)), key=influence.__getitem__)]
    small = load(tmp_path / "out")
    assert small.config.num_hidden_layers == 1
    assert report["after"]["parameters"] == sum(p.numel() for p in small.parameters()) < report["before"]["parameters"]
    kept = 1 - report["dropped_layers"][0]
    torch.testing.assert_close(small.model.layers[0].mlp.down_proj.weight,
                               load(exported).model.layers[kept].mlp.down_proj.weight)
    assert json.loads((tmp_path / "out" / "llmray_export.json").read_text())["prune"]["dropped_layers"] == \
        report["dropped_layers"]
    assert report["after"]["ppl"] > 0 and (tmp_path / "out" / "prune_report.json").is_file()


def samples_of(exported, count):
    from llmray.data.pack import StreamSpec, first_samples

    return first_samples(StreamSpec.of([("c", 1.0, lineage.recorded_held_out(exported).documents)], str(exported), 64, 1234,
                                       512), count)


def test_block_influence_is_one_minus_cosine_of_each_layers_input_and_output(exported):
    model = load(exported)
    samples = samples_of(exported, 4)
    with torch.no_grad():
        h = model(input_ids=torch.as_tensor(samples, dtype=torch.long), output_hidden_states=True).hidden_states
    expected = [1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item() for a, b in zip(h[:-1], h[1:])]
    assert block_influence(model, samples) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_sparsity_and_two_four_pattern(exported, tmp_path, method):
    report = prune_folder(str(exported), str(tmp_path / "half"), PruneSettings(method=method, sparsity=0.5, **FEW))
    assert report["after"]["nonzero_share"] == pytest.approx(0.5, abs=0.01)
    assert report["before"]["nonzero_share"] == pytest.approx(1.0)
    report = prune_folder(str(exported), str(tmp_path / "24"), PruneSettings(method=method, pattern="2:4", **FEW))
    w = load(tmp_path / "24").model.layers[0].self_attn.q_proj.weight
    assert (w.reshape(w.shape[0], -1, 4).ne(0).sum(-1) <= 2).all()
    embed = load(tmp_path / "24").model.embed_tokens.weight
    assert embed.ne(0).all(), "embeddings stay dense"


def test_wanda_weighs_magnitudes_by_their_inputs(exported, tmp_path):
    prune_folder(str(exported), str(tmp_path / "m"), PruneSettings(method="magnitude", sparsity=0.5, **FEW))
    prune_folder(str(exported), str(tmp_path / "w"), PruneSettings(method="wanda", sparsity=0.5, **FEW))
    m = load(tmp_path / "m").model.layers[0].mlp.up_proj.weight.ne(0)
    w = load(tmp_path / "w").model.layers[0].mlp.up_proj.weight.ne(0)
    assert not torch.equal(m, w)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "magnitude", "sparsity": 1.5}, r"--sparsity must be in \(0, 1\)"),
    ({"method": "magnitude", "pattern": "3:5"}, r"--pattern 3:5: 5 does not divide the 64 inputs"),
    ({"method": "magnitude", "pattern": "4:2"}, r"--pattern '4:2' is not N:M"),
    ({"method": "magnitude"}, r"takes --sparsity S .* or --pattern N:M"),
    ({"method": "depth", "drop_layers": 2}, r"--drop-layers must be between 1 and 1 \(the model has 2 layers\)"),
    ({"method": "depth", "drop_layers": 1, "sparsity": 0.5}, r"--sparsity does not apply to --method depth"),
    ({"method": "width"}, r"--method width takes --hidden-size, --intermediate-size, --heads: at least one"),
    ({"method": "width", "hidden_size": 65}, r"--hidden-size must be between 1 and the model's 64; got 65"),
    ({"method": "width", "heads": 4, "intermediate_size": 128}, r"the targets are the model's own widths"),
])
def test_bad_arguments_are_refused_and_nothing_is_written(exported, tmp_path, kwargs, message):
    with pytest.raises(PruneError, match=message):
        prune_folder(str(exported), str(tmp_path / "out"), PruneSettings(**kwargs, **FEW))
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_and_a_quantized_prune_names_its_input_report(exported, tmp_path):
    from llmray.errors import LlmrayError
    from llmray.quantize.folder import quantize_folder
    from llmray.recipe.schema import QuantSettings

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(LlmrayError, match="already exists"):
        prune_folder(str(exported), str(tmp_path / "out"), PruneSettings(method="depth", drop_layers=1, **FEW))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    prune_folder(str(exported), str(tmp_path / "pruned"), PruneSettings(method="depth", drop_layers=1, **FEW))
    report = quantize_folder(str(tmp_path / "pruned"), str(tmp_path / "q"),
                             QuantSettings(method="ptq", scheme="int8-dynamic"), eval_samples=8)
    assert report["input_report"]["method"] == "depth"
    assert report["input_report"]["file"].endswith("pruned/prune_report.json")
    chain = json.loads((tmp_path / "q" / "llmray_export.json").read_text())
    assert chain["prune"]["method"] == "depth" and chain["quant"]["scheme"] == "int8-dynamic"


def test_width_makes_a_narrower_model_transformers_loads(exported, tmp_path):
    spec = PruneSettings(method="width", hidden_size=48, intermediate_size=64, heads=2, **FEW)
    report = prune_folder(str(exported), str(tmp_path / "narrow"), spec)
    small = load(tmp_path / "narrow")
    c = small.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (48, 64, 2, 2, 16)
    assert small.model.layers[1].self_attn.q_proj.weight.shape == (32, 48)
    assert small.model.layers[1].mlp.down_proj.weight.shape == (48, 64)
    assert report["after"]["parameters"] == sum(p.numel() for p in small.parameters()) < report["before"]["parameters"]
    assert report["width"] == {"hidden_size": 48, "intermediate_size": 64, "heads": 2, "kv_heads": 2}
    assert 1 < report["after"]["ppl"] < float("inf")


def zero_group_and_channels(model, group: int, channels: int) -> None:
    """Make key/value group `group` and the first `channels` MLP channels of every layer output nothing."""
    shape = width.shape_of(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[group * shape.head_dim:(group + 1) * shape.head_dim] = 0
            layer.mlp.up_proj.weight[:channels] = 0


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_width_removes_exactly_the_heads_and_channels_that_do_nothing(exported, kv_heads):
    """Heads and channels whose output is zero rank last and go; the model's outputs do not change. With
    grouped-query attention a whole group (a key/value head and its two query heads) goes."""
    from transformers import LlamaForCausalLM

    config = load(exported).config
    config.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    zero_group_and_channels(model, group=1, channels=40)
    samples = samples_of(exported, 4)
    ids = torch.as_tensor(samples, dtype=torch.long)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    heads = 4 - 4 // kv_heads
    target = check_spec(model, PruneSettings(method="width", heads=heads, intermediate_size=88))
    kept = width.shrink(model, width.importance(model, samples), target)
    assert all(1 not in groups for groups in kept["kept_groups"])
    assert model.model.layers[0].self_attn.k_proj.weight.shape[0] == (kv_heads - 1) * 16
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_grouped_heads_go_whole(exported):
    from transformers import LlamaForCausalLM

    config = load(exported).config
    config.num_key_value_heads = 2
    with pytest.raises(PruneError, match=r"--heads 3: .* groups of 2, which go whole; ask for a multiple of 2"):
        check_spec(LlamaForCausalLM(config), PruneSettings(method="width", heads=3))


def test_a_recipe_prune_block_prunes_into_the_run_folder_once(corpus, exported, tmp_path):
    from helpers import tiny

    from llmray.prune.recover import with_pruned_model
    from llmray.recipe.schema import RecipeError
    from llmray.train.trainer import check_pruned

    recipe = tiny(corpus, tmp_path, f"model.pretrained={exported}", "prune.method=wanda", "prune.sparsity=0.5",
                  "prune.calibration_samples=8")
    with pytest.raises(RecipeError, match="is not the model this prune: block makes; resolve the block first"):
        check_pruned(recipe)  # training never prunes: the block is resolved before fit
    first = with_pruned_model(recipe)
    check_pruned(first)
    pruned = tmp_path / "pretrain-tiny" / "pruned"
    assert first.model.pretrained == str(pruned) and first.prune == recipe.prune
    assert load(pruned).model.layers[0].mlp.up_proj.weight.eq(0).float().mean() == pytest.approx(0.5, abs=0.01)
    made = (pruned / "model.safetensors").stat().st_mtime_ns
    assert with_pruned_model(recipe).model.pretrained == str(pruned)  # a resumed run finds it
    assert (pruned / "model.safetensors").stat().st_mtime_ns == made
    other = recipe.model_copy(update={"prune": recipe.prune.model_copy(update={"sparsity": 0.25})})
    with_pruned_model(other)  # another spec prunes again
    assert load(pruned).model.layers[0].mlp.up_proj.weight.eq(0).float().mean() == pytest.approx(0.25, abs=0.01)
