import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmray.data import shard as shard_mod
from llmray.data.corpus import CorpusError, list_shards
from llmray.data.shard import MANIFEST, ShardError, shard_corpus
from llmray.data.tokenizer import TokenizerError, load_tokenizer, train_tokenizer


@pytest.fixture
def mixed_inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("alpha " * 200)
    (src / "blank.txt").write_text("   \n\n")
    (src / "bad.txt").write_bytes(b"caf\xe9 latin-1 bytes " * 50)
    (src / "docs.jsonl").write_text(
        json.dumps({"text": "first json doc " * 20}) + "\n"
        + "{not json\n"
        + json.dumps({"other": 1}) + "\n"
        + json.dumps({"text": ""}) + "\n"
        + json.dumps({"text": "second json doc " * 20, "id": "j2"}) + "\n")
    pq.write_table(pa.table({"text": [f"parquet row {i} " * 30 for i in range(40)] + [""]}), src / "p.parquet")
    (src / "ignored.py").write_text("print('not included by default')")
    return src


def read_all(folder):
    return [r for s in list_shards(str(folder)) for r in pq.read_table(s.path).to_pylist()]


def test_shard_mixed_inputs(mixed_inputs, tmp_path):
    out = tmp_path / "shards"
    report = shard_corpus([str(mixed_inputs)], str(out), shard_size="1KB")
    rows = read_all(out)
    texts = [r["text"] for r in rows]
    assert len(texts) == report.documents == 1 + 1 + 2 + 40  # a, bad, two json docs, 40 parquet rows
    assert report.empty_skipped == 3  # blank.txt, empty json text, empty parquet row
    assert "alpha " * 200 in texts and "second json doc " * 20 in texts
    assert any("caf\ufffd" in t for t in texts) and report.files_with_replaced_bytes == [str(mixed_inputs / "bad.txt")]
    assert any("docs.jsonl:2: not valid JSON" in p for p in report.problems)
    assert any("docs.jsonl:3: no string field 'text'" in p for p in report.problems)
    assert not any("not included" in t for t in texts)
    assert len(report.shards) > 3  # 1KB target splits the ~12 KB of text
    assert all(s.stat().st_size > 0 for s in out.glob("shard-*.parquet"))
    assert {r["doc_id"] for r in rows} >= {"j2", str(mixed_inputs / "a.txt")}
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["documents"] == report.documents and len(manifest["shards"]) == len(report.shards)
    assert not list(out.glob("*.partial"))


def test_existing_output_kept_unless_overwrite(mixed_inputs, tmp_path):
    out = tmp_path / "shards"
    shard_corpus([str(mixed_inputs)], str(out))
    before = (out / "shard-00000.parquet").read_bytes()
    with pytest.raises(ShardError, match="already holds shards"):
        shard_corpus([str(mixed_inputs / "a.txt")], str(out))
    assert (out / "shard-00000.parquet").read_bytes() == before


def test_empty_corpus_and_missing_input(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "blank.txt").write_text("\n")
    with pytest.raises(ShardError, match="empty corpus"):
        shard_corpus([str(tmp_path / "e")], str(tmp_path / "out"))
    assert not (tmp_path / "out" / MANIFEST).exists()
    with pytest.raises(ShardError, match="input .*missing does not exist"):
        shard_corpus([str(tmp_path / "missing")], str(tmp_path / "out2"))


def test_crash_midway_leaves_no_partial_shard_looking_complete(mixed_inputs, tmp_path, monkeypatch):
    real = shard_mod._documents

    def failing(fs, info, source, text_field, report):
        if source.endswith("p.parquet"):
            yield from list(real(fs, info, source, text_field, report))[:5]
            raise OSError("disk vanished")
        yield from real(fs, info, source, text_field, report)

    monkeypatch.setattr(shard_mod, "_documents", failing)
    out = tmp_path / "shards"
    with pytest.raises(OSError, match="disk vanished"):
        shard_corpus([str(mixed_inputs)], str(out), shard_size="100KB")
    assert not list(out.glob("*.partial")) and not (out / MANIFEST).exists()
    assert not list(out.glob("*.parquet"))  # the one shard in progress was dropped, not left half-written


def test_list_shards_reports_bad_folders(tmp_path, mixed_inputs):
    with pytest.raises(CorpusError, match="shard folder .*nowhere does not exist"):
        list_shards(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .parquet shards"):
        list_shards(str(tmp_path / "empty"))
    out = tmp_path / "shards"
    shard_corpus([str(mixed_inputs)], str(out), shard_size="4KB")
    victim = sorted(out.glob("shard-*.parquet"))[1]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated mid-file
    with pytest.raises(CorpusError, match=f"shard {victim} is corrupt"):
        list_shards(str(out))
    victim.unlink()
    with pytest.raises(CorpusError, match=f"{victim.name} is listed in {MANIFEST} but missing"):
        list_shards(str(out))


def test_tokenizer_trains_and_round_trips(tmp_path, mixed_inputs):
    from transformers import AutoTokenizer

    shards = tmp_path / "shards"
    shard_corpus([str(mixed_inputs)], str(shards))
    train_tokenizer(str(shards), 400, str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))  # plain transformers, no llmray code
    text = "parquet row 7 — café ünïcode"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>" and len(tok) <= 400
    with pytest.raises(TokenizerError, match="tokenizer ./no/such/tok does not exist"):
        load_tokenizer("./no/such/tok")


def test_stream_tokenizer_loads_without_transformers_and_encodes_the_same(tmp_path, mixed_inputs):
    """The tokenize tasks read tokenizer.json directly (no transformers import: ~2 s of start-up per worker process) and
    must encode exactly as the transformers tokenizer of the same folder does."""
    import subprocess
    import sys

    shards = tmp_path / "shards"
    shard_corpus([str(mixed_inputs)], str(shards))
    train_tokenizer(str(shards), 400, str(tmp_path / "tok"))
    probe = ("import sys; from llmray.data.tokenizer import load_fast; "
             f"tok, eos = load_fast({str(tmp_path / 'tok')!r}); "
             "print(eos, tok.encode('parquet row 7 — café', add_special_tokens=False).ids, 'transformers' in sys.modules)")
    hf = load_tokenizer(str(tmp_path / "tok"))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "False", "loading the stream's tokenizer imported transformers"
    assert int(out[0]) == hf.eos_token_id
    assert " ".join(out[1:-1]) == str(hf.encode("parquet row 7 — café", add_special_tokens=False))
