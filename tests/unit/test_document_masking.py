"""data.document_masking without Ray: packed rows carry position ids that restart at every document and every row,
and with them a packed document's logits are the ones it gets alone (transformers masks attention between the
documents it reads off the position ids)."""

import numpy as np
import torch

from llmray.data.pack import Packer, StreamSpec, document_positions
from llmray.data.split import Documents


def test_positions_restart_at_each_document_and_row():
    # documents of 3, 1 and 6 tokens, each followed by its EOS, packed into rows of 4 (the last token left over)
    positions = document_positions([3, 1, 6], seq_len=4, n_rows=3)
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 3]]


def test_packed_rows_restart_after_every_eos(corpus):
    spec = StreamSpec.of([("c", 1.0, Documents(corpus["shards"]))], corpus["tokenizer"], 64, 0, 64,
                         document_masking=True)
    packer = Packer(spec)
    rows = packer.piece(spec.sources[0], spec.sources[0].pieces[0])
    ids, pos = rows["input_ids"], rows["position_ids"]
    assert ids.shape == pos.shape and len(ids) > 2
    after_eos = np.zeros_like(ids, dtype=bool)
    after_eos[:, 1:] = ids[:, :-1] == packer.eos[0]
    after_eos[:, 0] = True  # each row starts a sequence
    assert ((pos == 0) == after_eos).all()
    plain = Packer(StreamSpec.of([("c", 1.0, Documents(corpus["shards"]))], corpus["tokenizer"], 64, 0, 64))
    assert set(plain.piece(spec.sources[0], spec.sources[0].pieces[0])) == {"input_ids"}


def test_a_packed_documents_logits_are_its_own():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64)).eval()
    a, b = torch.randint(0, 100, (1, 7)), torch.randint(0, 100, (1, 9))
    row = torch.cat([a, b], dim=1)
    masked = torch.from_numpy(document_positions([6, 8], seq_len=16, n_rows=1)).long()  # a and b, each with its EOS
    with torch.no_grad():
        alone = model(input_ids=b).logits
        packed = model(input_ids=row, position_ids=masked, use_cache=False).logits[:, 7:]
        unmasked = model(input_ids=row, use_cache=False).logits[:, 7:]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # without the position ids, b attends to a
