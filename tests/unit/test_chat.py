"""Fine-tuning data: conversation formats, the chat template's assistant mask, and packing without
cross-contamination (each conversation's loss in a packed row equals its loss alone)."""

import json

import numpy as np
import pytest
import torch

from llmray.data.chat import ChatDataError, read_conversations, shard_conversations
from llmray.data.corpus import list_shards
from llmray.data.pack import chat_rows
from llmray.data.template import CHATML, IGNORE_INDEX, encode_chat, render, stop_token_ids
from llmray.train.batch import model_inputs

CONVERSATIONS = [
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "Six, of course."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from llmray.data.shard import shard_corpus
    from llmray.data.tokenizer import load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("chat")
    (root / "text").mkdir()
    for i in range(20):
        (root / "text" / f"{i}.txt").write_text(
            f"Question {i}: what is the capital of France? Answer: Paris. Two plus two is four, colour blue.\n" * 5)
    shard_corpus([str(root / "text")], str(root / "shards"))
    train_tokenizer(str(root / "shards"), 400, str(root / "tok"))
    return load_tokenizer(str(root / "tok"))


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return str(path)


def test_three_formats_read_as_the_same_messages(tmp_path):
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n\nthere"},
        {"role": "assistant", "content": "Hello."}]}])
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"system": "Be brief.", "instruction": "Hi", "input": "there",
                                                 "output": "Hello."}])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi\n\nthere"},
        {"from": "gpt", "value": "Hello."}]}])
    read = [list(read_conversations(p))[0] for p in (messages, alpaca, sharegpt)]
    assert read[0][1] == read[1][1] == read[2][1] and read[0][2] is None
    assert [m["role"] for m in read[0][1]] == ["system", "user", "assistant"]
    assert read[0][0] == f"{messages}:1"


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "field 'messages[0].role': 'bot' is not one of"),
    ('{"messages": [{"role": "user", "content": 3}]}', "field 'messages[0].content' must be a string"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
    ('{"prompt": "a", "completion": "b"}', "not a known conversation format"),
])
def test_a_bad_line_is_skipped_and_named_by_file_line_and_field(tmp_path, line, problem):
    good = json.dumps({"messages": CONVERSATIONS[2]})
    path = tmp_path / "m.jsonl"
    path.write_text(line + "\n" + good + "\n\n" + line + "\n")
    read = list(read_conversations(str(path)))
    assert [(doc, m is not None) for doc, m, _ in read] == [(f"{path}:1", False), (f"{path}:2", True),
                                                            (f"{path}:4", False)]
    assert problem in read[0][2] and read[2][2]  # (line 4 is read in the format line 2 showed)


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ChatDataError, match="e.jsonl: empty file"):
        list(read_conversations(str(tmp_path / "e.jsonl")))


def test_conversations_become_shards_once_and_again_when_the_inputs_change(tmp_path, tokenizer):
    src = tmp_path / "data"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"messages": c} for c in CONVERSATIONS])
    write_jsonl(src / "b.jsonl", [{"instruction": "Say hi", "output": "Hi."}])
    made = shard_conversations(str(src), str(tmp_path / "out"), tokenizer, 256)
    assert (made.documents, made.skipped, made.longer) == (4, [], 0)
    assert sum(s.rows for s in list_shards(str(tmp_path / "out"))) == 4
    again = shard_conversations(str(src), str(tmp_path / "out"), tokenizer, 256)
    assert again.reused and again.documents == 4 and "made earlier" in again.text()
    # a changed file, a bad line and a conversation longer than seq_len: made again, reported
    (src / "b.jsonl").write_text('{"instruction": "Say hi", "output": "Hi."}\n{"instruction": "Bye"}\n'
                                 + json.dumps({"instruction": "Count", "output": " ".join(map(str, range(200)))})
                                 + "\n")
    made = shard_conversations(str(src), str(tmp_path / "out"), tokenizer, 256)
    assert not made.reused and made.documents == 5 and made.longer == 1
    assert made.skipped == [f"{src / 'b.jsonl'}:2: field 'output' must be a string (got NoneType) (alpaca format)"]
    assert f"skipped {src / 'b.jsonl'}:2" in made.text()
    (src / "a.jsonl").write_text("{broken\n")
    (src / "b.jsonl").write_text("{broken\n")
    with pytest.raises(ChatDataError, match="no usable conversation .* first problem: .*a.jsonl:1: not valid JSON"):
        shard_conversations(str(src), str(tmp_path / "out"), tokenizer, 256)


def test_a_role_the_template_refuses_is_skipped_and_named(tmp_path, tokenizer):
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CONVERSATIONS])
    made = shard_conversations(src, str(tmp_path / "out"), strict, 256)
    assert made.documents == 2
    assert made.skipped == [f"{src}:1: the chat template refused it: System role not supported"]


def test_our_tokenizers_carry_the_chat_template_and_turn_tokens(tokenizer):
    assert tokenizer.chat_template == CHATML
    ids = tokenizer.encode("<|im_start|>user<|im_end|>", add_special_tokens=False)
    marks = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert [ids[0], ids[-1]] == marks and marks[0] not in ids[1:-1], "the turn markers are single special tokens"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer)


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer):
    ids, mask = encode_chat(tokenizer, CONVERSATIONS[1])
    trained = tokenizer.decode(ids[mask])
    assert trained == "Four.<|im_end|>\nSix, of course.<|im_end|>\n"
    assert tokenizer.decode(ids) == render(tokenizer, CONVERSATIONS[1])


def per_token_loss(model, input_ids, labels, position_ids=None) -> torch.Tensor:
    """Through the training loop's own `model_inputs`, as a micro-batch of one row."""
    batch = {"input_ids": np.asarray(input_ids)[None], "labels": np.asarray(labels)[None]}
    if position_ids is not None:
        batch["position_ids"] = np.asarray(position_ids)[None]
    inputs = model_inputs(batch, torch.device("cpu"))
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[0]
    target = torch.as_tensor(labels, dtype=torch.long)
    return torch.nn.functional.cross_entropy(logits[:-1], target[1:], ignore_index=IGNORE_INDEX, reduction="none")


@torch.no_grad()
def test_each_conversation_in_a_packed_row_has_its_loss_alone(tokenizer, tiny_model):
    rows = chat_rows(tokenizer, CONVERSATIONS, seq_len=256)
    assert len(rows["input_ids"]) == 1, "all three conversations fit one row"
    ids, labels, pos = rows["input_ids"][0], rows["labels"][0], rows["position_ids"][0]
    packed = per_token_loss(tiny_model, ids, labels, pos)
    starts = [i for i in range(len(pos)) if pos[i] == 0]
    for k, messages in enumerate(CONVERSATIONS):
        alone_ids, mask = encode_chat(tokenizer, messages)
        alone_labels = np.where(mask, alone_ids, IGNORE_INDEX)
        alone_labels[0] = IGNORE_INDEX
        alone = per_token_loss(tiny_model, alone_ids, alone_labels)
        a = starts[k]
        mine = packed[a:a + len(alone_ids) - 1]
        valid = alone_labels[1:] != IGNORE_INDEX
        assert np.array_equal(labels[a:a + len(alone_ids)], alone_labels)
        torch.testing.assert_close(mine[valid].mean(), alone[valid].mean(), atol=1e-5, rtol=0)
    # without the position ids the same row lets conversations attend to each other: the check above could fail
    mixed = per_token_loss(tiny_model, ids, labels)
    assert not torch.allclose(mixed[starts[1]:starts[2] - 1], packed[starts[1]:starts[2] - 1], atol=1e-4)


@torch.no_grad()
def test_loss_depends_on_assistant_tokens_only(tokenizer, tiny_model):
    rows = chat_rows(tokenizer, CONVERSATIONS[:1], seq_len=64)
    ids, labels, pos = rows["input_ids"][0].copy(), rows["labels"][0], rows["position_ids"][0]
    trained = np.flatnonzero(labels != IGNORE_INDEX)

    def loss(input_ids, lab):
        batch = {"input_ids": input_ids[None], "labels": lab[None], "position_ids": pos[None]}
        return tiny_model(**model_inputs(batch, torch.device("cpu"))).loss.item()

    base = loss(ids, labels)
    # a prompt token's label path: labelling it as something else changes nothing (it is not trained on)
    prompt = int(np.flatnonzero(labels == IGNORE_INDEX)[3])
    relabelled = labels.copy()
    relabelled[prompt] = IGNORE_INDEX
    assert loss(ids, relabelled) == base
    # an assistant token changed: the loss changes
    changed = labels.copy()
    changed[trained[0]] = (changed[trained[0]] + 7) % len(tokenizer)
    assert abs(loss(ids, changed) - base) > 1e-4


def test_packing_keeps_conversations_whole_and_cuts_only_the_too_long(tokenizer):
    lengths = [len(encode_chat(tokenizer, c)[0]) for c in CONVERSATIONS]
    seq = max(lengths) + 2
    rows = chat_rows(tokenizer, CONVERSATIONS, seq_len=seq)
    for pos in rows["position_ids"]:
        segments = np.split(pos, np.flatnonzero(pos == 0)[1:])
        assert all(np.array_equal(s, np.arange(len(s))) for s in segments)
    kept = [len(s) for p, lab in zip(rows["position_ids"], rows["labels"])
            for s, sl in zip(np.split(p, np.flatnonzero(p == 0)[1:]), np.split(lab, np.flatnonzero(p == 0)[1:]))
            if (sl != IGNORE_INDEX).any()]
    assert kept == lengths, "every conversation whole, in order"
    short = chat_rows(tokenizer, CONVERSATIONS, seq_len=16)
    assert short["input_ids"].shape[1] == 16 and (short["labels"] != IGNORE_INDEX).any(axis=1).all()


def test_unknown_lora_targets_are_named_with_the_models_linear_layers():
    from transformers import LlamaConfig

    from llmray.model.lora import check_targets
    from llmray.recipe.schema import LoraSettings, RecipeError

    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)
    check_targets(config, LoraSettings(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(RecipeError, match="'qproj' not among the model's Linear layers: down_proj, gate_proj, k_proj, "
                                          "o_proj, q_proj, up_proj, v_proj"):
        check_targets(config, LoraSettings(target_modules=["qproj", "v_proj"]))


def test_a_split_is_read_from_the_hubs_file_names():
    from llmray.data.chat import in_split

    assert in_split("data/train-00000-of-00002.parquet", "train") and in_split("train/part.jsonl", "train")
    assert in_split("main/test-00000-of-00001.parquet", "test") and in_split("test.jsonl", "test")
    assert not in_split("data/test-00000-of-00001.parquet", "train")
    assert not in_split("data/train_sft-00000-of-00003.parquet", "train")  # another split: train_sft
    assert in_split("data/train_sft-00000-of-00003.parquet", "train_sft")
