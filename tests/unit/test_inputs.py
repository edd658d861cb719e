"""What training checks before Ray starts: a missing or corrupt shard folder and a missing tokenizer are refused,
naming the path, before any worker (or Ray itself) is started."""

import pytest
from helpers import tiny

from llmray.data.corpus import CorpusError
from llmray.train.trainer import fit


@pytest.mark.parametrize("bad", ["tokenizer"])
def test_bad_tokenizer_is_reported_before_streaming(corpus, bad, tmp_path):
    from llmray.data.tokenizer import TokenizerError
    from llmray.recipe.load import recipe_from_dict
    from llmray.train.trainer import check_inputs

    r = recipe_from_dict({"data": {"shards": corpus["shards"], "tokenizer": str(tmp_path / "missing-tok")}})
    with pytest.raises(TokenizerError, match="missing-tok does not exist"):
        check_inputs(r)


def test_bad_shards_fail_before_workers_start(corpus, tmp_path):
    with pytest.raises(CorpusError, match="shard folder .*nope does not exist"):
        fit(tiny(corpus, tmp_path, f"data.shards={tmp_path / 'nope'}"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shard-00000.parquet").write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(CorpusError, match=f"shard {bad / 'shard-00000.parquet'} is corrupt"):
        fit(tiny(corpus, tmp_path, f"data.shards={bad}"))


def test_qlora_where_bitsandbytes_cannot_load_is_refused_before_ray(monkeypatch):
    import sys

    from llmray.model.lora import check_qlora
    from llmray.recipe.schema import RecipeError

    check_qlora()  # here it loads
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a platform without it: import fails
    with pytest.raises(RecipeError, match="finetune.method=qlora needs bitsandbytes .*use finetune.method=lora"):
        check_qlora()
