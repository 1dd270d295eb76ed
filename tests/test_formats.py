"""Formats: prompt masking, chat templates, EOS in labels."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from launcher.data.formats import IGNORE, FormatContext, RowError, alpaca, chat, completion
from launcher.recipe.schema import DataCfg


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def ctx(tok, **data):
    """A format's context for `data` keys over the schema's defaults (train: unused)."""
    cfg = DataCfg(train="unused.jsonl", **{"max_length": 256, **data})
    return FormatContext(tokenizer=tok, cfg=cfg)


CONVO = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "say red"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "and blue"},
    {"role": "assistant", "content": "blue green"},
]


def test_chat_ids_equal_apply_chat_template(tok):
    ex = chat({"messages": CONVO}, ctx(tok))
    ref = tok.apply_chat_template(CONVO, tokenize=True, return_dict=False)
    assert ex["input_ids"] == list(ref)  # training renders exactly what inference will


def test_chat_loss_only_on_assistant_turns_with_eos(tok):
    ex = chat({"messages": CONVO}, ctx(tok))
    learned = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    text = tok.decode(learned)
    assert text.replace("\n", "") == "red<|im_end|>blue green<|im_end|>"
    assert learned.count(tok.eos_token_id) == 2


def test_chat_learns_the_first_answer_token_after_a_prompt_ending_in_a_space(tok):
    """LLaVA/Vicuna-style templates end the prompt with "ASSISTANT: "; byte-level BPE
    merges that space into the answer's first token (" red"), which must be learned."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = (
        "{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
    )
    ex = chat({"messages": CONVO[1:3]}, ctx(t))
    learned = [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    assert t.decode(learned) == " red<|im_end|>\n"  # the space came with the first token


def test_chat_without_assistant_is_a_bad_row(tok):
    with pytest.raises(RowError, match="no assistant"):
        chat({"messages": CONVO[:2]}, ctx(tok))


def test_chat_malformed_message(tok):
    with pytest.raises(RowError, match="message 1"):
        chat({"messages": [CONVO[0], {"role": "user"}]}, ctx(tok))


def test_alpaca_masks_prompt_and_appends_eos(tok):
    ex = alpaca({"instruction": "say hello", "input": "", "output": "hello world"}, ctx(tok))
    learned = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    assert tok.decode(learned) == "hello world<|im_end|>"
    assert ex["labels"][0] == IGNORE


def test_train_on_prompt_learns_every_token_of_the_same_ids(tok):
    """data.train_on_prompt: the same tokens as the default, every one of them a target."""
    for fmt, row in (
        (chat, {"messages": CONVO}),
        (alpaca, {"instruction": "say hello", "input": "", "output": "hello world"}),
    ):
        default, everything = fmt(row, ctx(tok)), fmt(row, ctx(tok, train_on_prompt=True))
        assert everything["input_ids"] == default["input_ids"]
        assert everything["labels"] == everything["input_ids"]
        assert IGNORE in default["labels"]


def test_train_on_prompt_needs_a_prompt_format(tmp_path, capsys, chat_recipe):
    from launcher.cli.main import main

    rc = main(["validate", str(chat_recipe), "-o", "data.format=completion",
               "-o", "data.train_on_prompt=true"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "data.train_on_prompt" in err and "Traceback" not in err, err


def test_completion_learns_everything_and_ends_with_eos(tok):
    ex = completion({"text": "the cat sat"}, ctx(tok))
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tok.eos_token_id


def test_truncation_is_counted(tok):
    c = ctx(tok, max_length=4)
    ex = completion({"text": "the cat sat on the mat the dog sat"}, c)
    assert len(ex["input_ids"]) == 4 and c.stats["truncated"] == 1


def test_missing_field_is_a_bad_row(tok):
    with pytest.raises(RowError, match="missing field 'text'"):
        completion({"body": "x"}, ctx(tok))
