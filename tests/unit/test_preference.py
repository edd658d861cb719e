"""Preference tuning's data and losses, without Ray: pairs read in TRL's formats (and refused where they are not
pairs), packed whole, and the losses and rewards equal TRL's own (DPOTrainer for dpo and ipo, CPOTrainer's loss
for simpo) on a fixed batch of a tiny random model in fp32, plus closed forms on hand-set log-probabilities."""

import copy
import json
import math
import tempfile

import pytest
import torch
from helpers import tiny_llama

from llmray import metric_names as M
from llmray.data.chat import ChatDataError, read_conversations, shard_conversations
from llmray.data.pack import pair_rows
from llmray.objectives.preference import pair_sums, preference_loss, side_sums
from llmray.recipe.schema import PreferenceSettings
from llmray.train.batch import model_inputs

PAIRS = [("what color is the sky", "the sky is blue", "the sky is green"),
         ("what color is the sea", "the sea is green", "hello"),
         ("hello", "hello world", "world"),
         ("what color", "blue", "the sea is blue and the sky is green")]


def conversational(q, c, r):
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}]}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_formats_people_have_become_one_pair(tmp_path):
    standard = write(tmp_path / "standard.jsonl", [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in PAIRS])
    conv = write(tmp_path / "conv.jsonl", [conversational(*p) for p in PAIRS])
    hh = write(tmp_path / "hh.jsonl", [{"chosen": [*conversational(q, c, r)["prompt"], {"role": "assistant", "content": c}],
                                        "rejected": [*conversational(q, c, r)["prompt"],
                                                     {"role": "assistant", "content": r}]} for q, c, r in PAIRS])
    # UltraFeedback: a prompt string beside whole [user, assistant] transcripts
    uf = write(tmp_path / "uf.jsonl", [{"prompt": q, "chosen": [*conversational(q, c, r)["prompt"],
                                                              {"role": "assistant", "content": c}],
                                        "rejected": [*conversational(q, c, r)["prompt"],
                                                     {"role": "assistant", "content": r}]} for q, c, r in PAIRS])
    read = [[pair for _, pair, _ in read_conversations(str(p), kind="pairs")] for p in (standard, conv, hh, uf)]
    assert read[0] == read[1] == read[2] == read[3] == [conversational(*p) for p in PAIRS]
    text = write(tmp_path / "text_hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello there",
                                               "rejected": "\n\nHuman: hi\n\nAssistant: go away"}])
    (_, pair, _), = read_conversations(str(text), kind="pairs")
    assert pair["prompt"][0]["content"] == "\n\nHuman: hi\n\nAssistant:"  # TRL's extract_prompt: the space stays
    assert pair["chosen"][0]["content"] == " hello there"


def test_bad_pairs_are_named_by_file_line_and_field_and_skipped(tmp_path, corpus):
    from llmray.data.tokenizer import load_tokenizer

    path = write(tmp_path / "p.jsonl", [conversational(*PAIRS[0]), {"prompt": "q", "chosen": "same", "rejected": "same"},
                                        {"prompt": "q", "chosen": "", "rejected": "x"},
                                        {"prompt": "q", "chosen": "long " * 200, "rejected": "x"}])
    made = shard_conversations(str(path), str(tmp_path / "out"), load_tokenizer(corpus["tokenizer"]), 128, kind="pairs")
    assert made.documents == 1 and made.kind == "pairs"
    problems = [p.split(": ", 1)[1] for p in made.skipped]
    assert [p.split(": ", 1)[0] for p in made.skipped] == [f"{path}:{n}" for n in (2, 3, 4)]
    assert problems[0].startswith("fields 'chosen' and 'rejected' are identical")
    assert problems[1].startswith("field 'chosen' is empty")
    assert problems[2].startswith("over the length: chosen and rejected take") and "data.seq_len is 128" in problems[2]
    hh = write(tmp_path / "hh.jsonl", [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                        "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]},
                                       {"chosen": [{"role": "user", "content": "a"}],
                                        "rejected": [{"role": "user", "content": "b"}]}])
    (_, _, none), (where, _, problem) = read_conversations(str(hh), kind="pairs")
    assert none is None and where == f"{hh}:2" and problem.startswith("fields 'chosen' and 'rejected' share no prompt")


def test_a_pair_file_is_not_a_conversation_file_nor_the_reverse(tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", [conversational(*PAIRS[0])])
    chats = write(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}]}])
    with pytest.raises(ChatDataError, match=r"pairs.jsonl holds preference pairs \(fields: prompt, chosen, rejected\)"):
        list(read_conversations(str(pairs)))
    with pytest.raises(ChatDataError, match=r"chats.jsonl holds conversations \(fields: messages\), not preference"):
        list(read_conversations(str(chats), kind="pairs"))


def test_losses_on_hand_set_log_probabilities():
    c, r = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -5.0])
    rc, rr = torch.tensor([-5.0, -8.0]), torch.tensor([-5.0, -6.0])
    nc, nr = torch.tensor([2.0, 4.0]), torch.tensor([3.0, 1.0])
    beta, eps = 0.5, 0.1
    z = [beta * ((c[i] - rc[i]) - (r[i] - rr[i])).item() for i in range(2)]  # 1.0 and -0.5... each pair's margin
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    dpo, m = preference_loss(PreferenceSettings(beta=beta, label_smoothing=eps), c, r, rc, rr, nc, nr)
    assert dpo.item() == pytest.approx(sum(-(1 - eps) * math.log(sig(x)) - eps * math.log(sig(-x)) for x in z) / 2)
    assert m[M.REWARDS_CHOSEN].item() == pytest.approx(beta * ((-4 + 5) + (-9 + 8)) / 2)
    assert m[M.REWARDS_ACCURACIES].item() == 0.5 and m[M.LOGPS_REJECTED].item() == -5.5
    assert m[M.REWARDS_MARGINS].item() == pytest.approx(sum(z) / 2)
    ipo, _ = preference_loss(PreferenceSettings(loss="ipo", beta=beta), c, r, rc, rr, nc, nr)
    want = [((c[i] - rc[i]) / nc[i] - (r[i] - rr[i]) / nr[i] - 1 / (2 * beta)).item() ** 2 for i in range(2)]
    assert ipo.item() == pytest.approx(sum(want) / 2)
    simpo, m = preference_loss(PreferenceSettings(loss="simpo", beta=2.0, simpo_gamma=0.5), c, r, None, None, nc, nr)
    want = [-math.log(sig(2.0 * (c[i] / nc[i] - r[i] / nr[i]).item() - 0.5)) for i in range(2)]
    assert simpo.item() == pytest.approx(sum(want) / 2) and m[M.REWARDS_CHOSEN].item() == pytest.approx(2 * (-2 - 2.25) / 2)


def test_a_pair_counts_only_with_both_sides_and_an_empty_batch_is_no_nan():
    values = torch.tensor([[0.0, -1.0, -2.0, 0.0, 0.0, -4.0, -3.0]])
    labels = torch.tensor([[-100, 5, 5, -100, -100, 5, 5]])
    sequence_ids = torch.tensor([[1, 1, 1, 2, 3, 3, 4]])  # pair 1's rejected side has no completion token
    c, r, nc, nr = pair_sums(values, labels, sequence_ids)
    assert c.tolist() == [-4.0] and r.tolist() == [-3.0] and nc.tolist() == [1.0] and nr.tolist() == [1.0]
    loss, metrics = preference_loss(PreferenceSettings(loss="ipo"), c[:0], r[:0], c[:0], r[:0], nc[:0], nr[:0])
    assert loss.item() == 0.0 and not any(math.isnan(v.item()) for v in metrics.values())


def test_pairs_are_packed_whole_and_summed_per_side(corpus):
    from llmray.data.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus["tokenizer"])
    rows = pair_rows(tok, [conversational(*p) for p in PAIRS], 96)
    seq = rows["sequence_ids"]
    assert seq.max() % 2 == 0 and sorted(set(seq[0]) - {0}) == list(range(1, seq[0].max() + 1))
    values = torch.ones(seq.shape)
    labels = torch.from_numpy(rows["labels"]).long()
    values = values * (labels != -100)
    for flat in (False, True):  # flattened into one row (flash attention), the pairs come out the same
        inputs = model_inputs(rows, torch.device("cpu"), flat=flat, sequences=True)
        c, r, nc, nr = pair_sums(values.reshape(inputs["labels"].shape), inputs["labels"], inputs["sequence_ids"])
        assert len(c) == len(PAIRS) and torch.equal(c, nc) and torch.equal(r, nr) and (nc > 0).all()


@pytest.fixture(scope="module")
def tiny_pair(corpus):
    """A random tiny Llama (the policy) and a perturbed copy (the reference), the corpus tokenizer."""
    from llmray.data.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus["tokenizer"])
    ref = tiny_llama(len(tok))
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok, policy, ref


def test_a_precomputed_reference_reads_back_as_if_it_had_run(tiny_pair):
    """The batch-inference pass's per-sequence sums, put back on the rows by the stream, give the loss the same
    reference log-probabilities as the reference model run in place (row by row there, as a micro-batch here)."""
    import numpy as np

    from llmray.data.pack import reference_column
    from llmray.objectives.reference import sequence_sums

    tok, _, ref = tiny_pair
    rows = pair_rows(tok, [conversational(*p) for p in PAIRS] * 3, 64)
    assert len(rows["input_ids"]) > 1  # several rows, so a row's sums cannot land in another's
    sums = {(7, k): row for k, row in enumerate(sequence_sums(ref, rows, torch.device("cpu")))}
    column = reference_column(rows["sequence_ids"], sums, 7)
    inputs = model_inputs({**rows, "reference_logps": column}, torch.device("cpu"), sequences=True)
    sequence_ids, precomputed = inputs.pop("sequence_ids"), inputs.pop("reference_logps")
    with torch.no_grad():
        in_place = side_sums(ref, inputs, sequence_ids)
    streamed = pair_sums(precomputed, inputs["labels"], sequence_ids)
    assert len(streamed[0]) > len(PAIRS)
    for a, b in zip(streamed, in_place):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a, b)
    with pytest.raises(RuntimeError, match="row 0 of piece 8"):  # a cache that does not match the data
        reference_column(rows["sequence_ids"], sums, 8)
    sums[(7, 0)] = np.zeros(1, dtype=np.float32)
    with pytest.raises(RuntimeError, match="packs .* sequences, its precomputed reference 1"):
        reference_column(rows["sequence_ids"], sums, 7)


@pytest.mark.parametrize("loss,sft_weight", [("dpo", 0.0), ("ipo", 0.0), ("dpo", 0.7)])
def test_loss_and_rewards_equal_trls_dpo_trainer(tiny_pair, loss, sft_weight):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok, policy, ref = tiny_pair
    cfg = PreferenceSettings(loss=loss, beta=0.1 if loss == "dpo" else 0.5, sft_weight=sft_weight)
    rows = pair_rows(tok, [conversational(*p) for p in PAIRS], 128)
    inputs = model_inputs(rows, torch.device("cpu"), sequences=True)
    sequence_ids = inputs.pop("sequence_ids")
    with torch.no_grad():
        c, r, nc, nr = side_sums(policy, inputs, sequence_ids)
        rc, rr, _, _ = side_sums(ref, inputs, sequence_ids)
    ours, metrics = preference_loss(cfg, c, r, rc, rr, nc, nr)

    args = DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, gradient_checkpointing=False,
                     report_to=[], per_device_train_batch_size=len(PAIRS), beta=cfg.beta,
                     loss_type=["sigmoid" if loss == "dpo" else "ipo"] + (["sft"] if sft_weight else []),
                     loss_weights=[1.0, sft_weight] if sft_weight else None, max_length=None)
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([conversational(*p) for p in PAIRS]))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    trainer.model.train()  # the metrics go to _metrics["train"]; the tiny model has no dropout
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    for name in M.PREFERENCE:
        assert abs(metrics[name].item() - logged[name]) < 1e-5, (name, metrics[name].item(), logged[name])


def test_simpo_equals_trls_cpo_loss():
    """TRL's SimPO (CPOTrainer, loss_type simpo) from its own loss function, on length-averaged log-probabilities."""
    import types

    from trl.experimental.cpo import CPOTrainer

    torch.manual_seed(1)
    c, r = -torch.rand(6) * 20, -torch.rand(6) * 20
    nc, nr = torch.randint(1, 9, (6,)).float(), torch.randint(1, 9, (6,)).float()
    cfg = PreferenceSettings(loss="simpo", beta=2.0, simpo_gamma=0.8)
    ours, metrics = preference_loss(cfg, c, r, None, None, nc, nr)
    stub = types.SimpleNamespace(beta=2.0, simpo_gamma=0.8, loss_type="simpo", label_smoothing=0.0, alpha=0.0,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, c / nc, r / nr)
    assert abs(ours.item() - losses.mean().item()) < 1e-6
    assert abs(metrics[M.REWARDS_CHOSEN].item() - chosen_rewards.mean().item()) < 1e-6
    assert abs(metrics[M.REWARDS_ACCURACIES].item() - (chosen_rewards > rejected_rewards).float().mean().item()) < 1e-6
