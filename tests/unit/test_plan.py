"""The stream's plan without Ray: pieces from Parquet metadata, the blend's schedule, and the recipe errors that a
blend of sources can hold, each reported in one line naming the source before Ray starts."""

import numpy as np
import pytest

from llmray.data.corpus import CorpusError, Shard
from llmray.data.plan import IMAGE_PIECE_ROWS, PIECE_SAMPLES, Blend, Schedule, plan_pieces
from llmray.recipe.load import recipe_from_dict
from llmray.recipe.schema import RecipeError
from llmray.train.checkpoint import CheckpointError
from llmray.train.resume import check_compatible
from llmray.train.state import TrainState


def test_pieces_cover_every_document_once_and_never_span_shards():
    target = PIECE_SAMPLES * 64 * 4
    shards = [Shard("a", 100, ((60, 10 * target), (40, target // 4))), Shard("b", 7, ((7, target // 10),))]
    pieces = plan_pieces(shards, seq_len=64)
    for index, shard in enumerate(shards):
        mine = pieces[pieces[:, 0] == index]
        assert mine[0, 1] == 0 and mine[-1, 2] == shard.rows and (mine[1:, 1] == mine[:-1, 2]).all()
    assert ((pieces[:, 1] < 60) == (pieces[:, 2] <= 60))[pieces[:, 0] == 0].all()  # the big row group is cut alone
    assert len(pieces[pieces[:, 0] == 0]) == 11 and len(pieces[pieces[:, 0] == 1]) == 1


def test_image_pieces_hold_a_few_documents_whatever_their_bytes():
    """Image conversations are a row each and mostly base64 image: a 224 px JPEG is about a text piece's bytes, a
    32 px PNG a hundredth of them; sized by bytes, their pieces held 1 image or hundreds."""
    target = PIECE_SAMPLES * 64 * 4
    shards = [Shard("jpegs", 10, tuple((2, 2 * target) for _ in range(5))), Shard("pngs", 400, ((400, target // 4),))]
    by_bytes = plan_pieces(shards, seq_len=64)
    assert (by_bytes[:, 2] - by_bytes[:, 1]).tolist() == [1] * 10 + [400]
    pieces = plan_pieces(shards, seq_len=64, rows_per_piece=IMAGE_PIECE_ROWS)
    sizes = pieces[:, 2] - pieces[:, 1]
    assert sizes.sum() == 410 and sizes[pieces[:, 0] == 0].max() <= IMAGE_PIECE_ROWS
    assert (sizes[pieces[:, 0] == 1] == IMAGE_PIECE_ROWS).all()


@pytest.mark.parametrize("weights", [[0.7, 0.2, 0.1], [0.5, 0.5], [0.97, 0.03]])
def test_blend_holds_every_window_within_a_row_of_its_weights(weights):
    blend = Blend(weights)
    picks = np.array([blend.next() for _ in range(5000)])
    for size in (50, 1000):
        for start in range(0, len(picks) - size, 97):
            counts = np.bincount(picks[start:start + size], minlength=len(weights))
            assert np.abs(counts - np.array(weights) * size).max() <= 2
    resumed = Blend(weights, list(np.bincount(picks[:1234], minlength=len(weights))))
    assert [resumed.next() for _ in range(100)] == picks[1234:1334].tolist()  # the counts are its whole state


@pytest.mark.parametrize("weights", [[1.0], [0.5, 0.5], [0.7, 0.3], [0.97, 0.03], [1 / 3, 2 / 3], [0.35001488, 0.64998512],
                                     [0.5, 0.3, 0.2], [0.7, 0.2, 0.1]])
def test_schedule_jumps_to_the_blends_picks_and_counts(weights):
    """Schedule (a closed form for one or two sources, a walk with marks for more) gives Blend's row-by-row picks
    and counts at any row, from the beginning and from a resumed position."""
    blend, rows = Blend(weights), 20_000
    picks = np.array([blend.next() for _ in range(rows)])
    schedule = Schedule(tuple(weights), (0,) * len(weights))
    assert schedule.closed == (len(weights) <= 2)
    for start, stop in ((0, rows), (12_345, 12_400), (19_990, rows), (5, 6)):
        np.testing.assert_array_equal(schedule.sources(start, stop), picks[start:stop])
        np.testing.assert_array_equal(schedule.counts(start), np.bincount(picks[:start], minlength=len(weights)))
    origin = tuple(np.bincount(picks[:1234], minlength=len(weights)).tolist())
    np.testing.assert_array_equal(Schedule(tuple(weights), origin).sources(100, 600), picks[1334:1834])


@pytest.mark.parametrize("sources, message", [
    ([{"name": "web", "shards": "w", "weight": 0}], "source 'web': weight must be > 0"),
    ([{"name": "web", "shards": "w", "weight": -1}], "source 'web': weight must be > 0"),
    ([{"name": "web", "shards": "w"}, {"name": "web", "shards": "x"}], "source 'web' is named twice"),
])
def test_bad_sources_are_named_in_one_line(sources, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"data": {"sources": sources, "tokenizer": "t"}})


def test_a_source_without_shards_is_named_before_ray_starts(corpus, tmp_path):
    from llmray.train.trainer import check_inputs

    (tmp_path / "empty").mkdir()
    recipe = recipe_from_dict({"data": {"tokenizer": corpus["tokenizer"], "sources": [
        {"name": "code", "shards": corpus["shards"]}, {"name": "books", "shards": str(tmp_path / "empty")}]}})
    with pytest.raises(CorpusError, match="source 'books': no .parquet shards in"):
        check_inputs(recipe)


def test_a_checkpoint_from_the_shard_by_shard_stream_is_refused_on_resume():
    old = TrainState.from_json({"step": 6, "cursor": {"epoch": 0, "position": 1, "offset": 3}, "recipe": {}})
    with pytest.raises(CheckpointError, match="cannot be resumed. It can still be exported"):
        check_compatible(old, {}, 1000, "ckpt")
