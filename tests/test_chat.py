"""SFT data: assistant-only loss from the chat template, packing that never crosses a conversation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from raysmol.post.chat import IGNORE, ChatError, assistant_spans, encode, ensure_template, pack

CONVS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Blue, of course."}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
]


@pytest.fixture(scope="module")
def tok(small_data, tmp_path_factory):
    from raysmol.data.tokenizer import resolve_tokenizer

    info = resolve_tokenizer(str(small_data["tokenizer"]), tmp_path_factory.mktemp("tok"))
    t = transformers.AutoTokenizer.from_pretrained(info.hf_dir)
    ensure_template(t)
    return t


def test_only_assistant_tokens_carry_loss(tok):
    for conv in CONVS:
        ids, mask = encode(tok, conv)
        text, spans = assistant_spans(tok, conv)
        learned = tok.decode(ids[mask])
        # Exactly the assistant contents (and their end-of-turn markers), in order; nothing of the prompts.
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        assert learned.replace(tok.eos_token, "").split() == " ".join(answers).split()
        assert learned.count(tok.eos_token) == len(answers)  # the model learns to stop
        prompt = tok.decode(ids[~mask])
        for m in conv:
            if m["role"] != "assistant":
                assert m["content"] in prompt
        assert all(text[a:b].startswith(c) for (a, b), c in zip(spans, answers))


def test_packing_keeps_whole_conversations_and_masks_prompts(tok):
    examples = [encode(tok, c) for c in CONVS * 3]
    seq = max(len(i) for i, _ in examples) + 8
    p = pack(examples, seq, tok.eos_token_id)
    assert sorted(i for row in p.conversations for i in row) == list(range(9)) and p.truncated == 0
    assert len(p.conversations) < 9  # several conversations share rows
    for r, members in enumerate(p.conversations):
        at = 0
        for i in members:
            ids, mask = examples[i]
            n = len(ids)
            assert list(p.input_ids[r, at:at + n]) == list(ids) and list(p.position_ids[r, at:at + n]) == list(range(n))
            want = np.where(mask[1:], ids[1:], IGNORE)
            assert list(p.labels[r, at:at + n - 1]) == list(want)
            assert p.labels[r, at + n - 1] == IGNORE  # a conversation's last token never predicts the next one
            at += n
        assert (p.labels[r, at:] == IGNORE).all()  # padding carries no loss
    long = pack(examples[:1], 5, tok.eos_token_id)
    assert long.truncated == 1 and long.input_ids.shape == (1, 5)


def test_a_conversation_never_attends_across_a_packing_boundary(tok):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    examples = [encode(tok, c) for c in CONVS]
    p = pack(examples, sum(len(i) for i, _ in examples), tok.eos_token_id)
    assert len(p.conversations) == 1  # all three in one row
    b = p.batch([0])
    with torch.no_grad():
        # With a KV cache (the default of most hub configs) transformers skips its packed-sequence detection and
        # documents would see each other: the objectives' inputs switch the cache off.
        from raysmol.train.objectives import model_inputs

        assert model.config.use_cache  # a hub-style config: the objective must still keep documents apart
        packed = model(**model_inputs(model, b)).logits[0]
        at = 0
        for i in p.conversations[0]:
            ids = torch.from_numpy(examples[i][0])[None]
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(packed[at:at + len(ids[0])], alone, atol=1e-5, rtol=1e-5)
            at += len(ids[0])


def test_bad_conversations_are_refused_with_the_reason(tok):
    with pytest.raises(ChatError, match="line 3: message 0 must be"):
        encode(tok, [{"role": "robot", "content": "x"}], "data.jsonl line 3")
    with pytest.raises(ChatError, match="no assistant message"):
        encode(tok, [{"role": "user", "content": "x"}])
    unstable = transformers.AutoTokenizer.from_pretrained(tok.name_or_path)
    unstable.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ChatError, match="not prefix-stable at message 1"):
        encode(unstable, CONVS[0])
