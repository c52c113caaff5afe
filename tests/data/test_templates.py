"""Chat templates and loss masks: parity with apply_chat_template and exact trained spans."""

from __future__ import annotations

import pytest

from tunelab.data import templates
from tunelab.data.conversation import Conversation, Turn
from tunelab.data.templates import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    SKIP_NO_TARGET,
    SKIP_TOO_LONG,
    encode,
    encode_or_skip,
    resolve_template,
)
from tunelab.errors import TunelabError

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is the capital of France? Tell me about machine learning and language models.",
    "hello world, this is a tiny tokenizer for tests 0123456789 !?.,;:'\"()[]{}",
    "Hello there, how are you? Fine, thanks. See you soon. Bye.",
] * 4

CHATML_SYSTEM = (  # Qwen2.5-like: a default system prompt when the conversation has none
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN3_LIKE = (  # history answers lose the (empty) think block that the last answer carries
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim }}"
    "{{ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
    "{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_MERGE = (  # the prompt ends with a space that BPE merges into the answer's first word
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST] ' }}{% elif m['role'] == 'assistant' %}"
    "{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
SYSTEM_IN_LAST_USER = (  # Mistral v0.3-like: the system prompt joins the last user turn
    "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% set rest = messages[1:] if sys else messages %}"
    "{% set last_user = namespace(i=-1) %}{% for m in rest %}"
    "{% if m['role'] == 'user' %}{% set last_user.i = loop.index0 %}{% endif %}{% endfor %}"
    "{{ bos_token }}{% for m in rest %}{% if m['role'] == 'user' %}"
    "{% if loop.index0 == last_user.i and sys %}{{ '[INST] ' + sys + '\n\n' + m['content']"
    " + '[/INST]' }}{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
EOS_AT_THE_END = (  # Phi-3-like: a whole chat (no generation prompt) ends with eos
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)
QWEN3_THINK = (  # history answers are rendered without their think block
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\n' + m['content'].split('</think>')[-1].strip() + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIALS = dict(
    specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    bos="<|im_start|>",
    eos="<|im_end|>",
)
LLAMA3_SPECIALS = dict(
    specials=[
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
)
MISTRAL_SPECIALS = dict(
    specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>"
)


def make_tokenizer(template: str | None, specials: list[str], bos: str, eos: str):
    """A small byte-level BPE ``PreTrainedTokenizerFast`` with the given specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=specials[0]
    )
    fast.chat_template = template
    return fast


TOKENIZERS = {
    "chatml": (CHATML_SPECIALS, None),  # the template lives in the tokenizer (ChatML)
    "qwen-default-system": (CHATML_SPECIALS, CHATML_SYSTEM),
    "llama-3": (LLAMA3_SPECIALS, LLAMA3_LIKE),
    "mistral": (MISTRAL_SPECIALS, MISTRAL_LIKE),
}
EOT = {"chatml": "<|im_end|>", "qwen-default-system": "<|im_end|>", "llama-3": "<|eot_id|>"}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def named_tokenizer(request):
    specials, template = TOKENIZERS[request.param]
    base = BUILTIN_TEMPLATES["chatml"] if template is None else template
    return request.param, make_tokenizer(base, **specials)


@pytest.fixture(scope="module")
def chatml_tok():
    return make_tokenizer(BUILTIN_TEMPLATES["chatml"], **CHATML_SPECIALS)


def conv(*pairs: tuple[str, str], source: str = "data.jsonl:7", **kw) -> Conversation:
    return Conversation(turns=[Turn(r, c) for r, c in pairs], source=source, **kw)


DIALOGUE = conv(
    ("system", "You answer briefly."),
    ("user", "What is the capital of France?"),
    ("assistant", "Paris, of course."),
    ("user", "And of Italy? Привет 👋"),
    ("assistant", "Rome 🇮🇹 is."),
)


def trained_runs(tok, enc) -> list[str]:
    """The decoded text of each contiguous run of trained tokens."""
    runs, cur = [], []
    for i, (x, y) in enumerate(zip(enc.input_ids, enc.labels, strict=True)):
        if y != IGNORE_INDEX:
            assert y == x, f"label {y} at {i} differs from its token {x}"
            cur.append(x)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def reference_ids(tok, c: Conversation, template: str) -> list[int]:
    return tok.apply_chat_template(
        c.to_messages(), chat_template=template, tokenize=True, return_dict=False
    )


def test_parity_and_exact_answer_spans(named_tokenizer):
    name, tok = named_tokenizer
    template = resolve_template(tok, None)
    enc = encode(DIALOGUE, tok, template)
    assert enc.input_ids == reference_ids(tok, DIALOGUE, template)
    if name == "mistral":  # the template drops the system turn; answers follow "[/INST]"
        assert trained_runs(tok, enc) == [" Paris, of course.</s>", " Rome 🇮🇹 is.</s>"]
    else:  # end-of-turn trained, the newline after it not
        assert trained_runs(tok, enc) == [
            f"Paris, of course.{EOT[name]}",
            f"Rome 🇮🇹 is.{EOT[name]}",
        ]
    assert not enc.truncated


def test_default_system_prompt_is_rendered_and_not_trained():
    tok = make_tokenizer(CHATML_SYSTEM, **CHATML_SPECIALS)
    c = conv(("user", "Hi"), ("assistant", "Hello there"))
    enc = encode(c, tok, CHATML_SYSTEM)
    assert "You are a helpful assistant." in tok.decode(enc.input_ids)
    assert enc.input_ids == reference_ids(tok, c, CHATML_SYSTEM)
    assert trained_runs(tok, enc) == ["Hello there<|im_end|>"]


def test_llama3_trimmed_content():
    tok = make_tokenizer(LLAMA3_LIKE, **LLAMA3_SPECIALS)
    c = conv(("user", "  Hi  "), ("assistant", "\n  Hello there \n"))
    enc = encode(c, tok, LLAMA3_LIKE)
    assert enc.input_ids[0] == tok.bos_token_id
    assert trained_runs(tok, enc) == ["Hello there<|eot_id|>"]


def test_history_rendered_differently_falls_back_to_content():
    tok = make_tokenizer(QWEN3_LIKE, **CHATML_SPECIALS)
    c = conv(
        ("user", "Hi"), ("assistant", "Hello there"), ("user", "Bye"), ("assistant", "See you")
    )
    enc = encode(c, tok, QWEN3_LIKE)
    assert enc.input_ids == reference_ids(tok, c, QWEN3_LIKE)
    # The last answer carries the template's empty think block: it is what the model generates.
    assert trained_runs(tok, enc) == [
        "Hello there<|im_end|>",
        "<think>\n\n</think>\n\nSee you<|im_end|>",
    ]


def test_an_answer_quoted_in_the_prompt_is_not_trained_there():
    """The system prompt lands in the last user turn, which lists the labels: the trained
    tokens are the answer after [/INST], not its copy in the prompt."""
    tok = make_tokenizer(SYSTEM_IN_LAST_USER, **MISTRAL_SPECIALS)
    c = conv(("system", "Answer with one word."), ("user", "one of: Paris, Rome. France?"),
             ("assistant", "Paris"))  # fmt: skip
    enc = encode(c, tok, SYSTEM_IN_LAST_USER)
    assert enc.input_ids == reference_ids(tok, c, SYSTEM_IN_LAST_USER)
    assert trained_runs(tok, enc) == [" Paris</s>"] or trained_runs(tok, enc) == ["Paris</s>"]


def test_an_answer_repeating_its_prompt_is_trained_after_the_prompt():
    tok = make_tokenizer(SYSTEM_IN_LAST_USER, **MISTRAL_SPECIALS)
    c = conv(("system", "Be brief."), ("user", "say hi"), ("assistant", "hi"),
             ("user", "again"), ("assistant", "ok"))  # fmt: skip
    enc = encode(c, tok, SYSTEM_IN_LAST_USER)
    assert enc.input_ids == reference_ids(tok, c, SYSTEM_IN_LAST_USER)
    assert [r.strip() for r in trained_runs(tok, enc)] == ["hi</s>", "ok</s>"]


def test_a_trimmed_turn_is_found_in_place_not_in_a_later_turn():
    tok = make_tokenizer(LLAMA3_LIKE, **LLAMA3_SPECIALS)
    c = Conversation(turns=[Turn("user", " hi", True), Turn("assistant", "oh hi there")],
                     source="x:1")  # fmt: skip
    assert trained_runs(tok, encode(c, tok, LLAMA3_LIKE)) == [
        "hi<|eot_id|>",
        "oh hi there<|eot_id|>",
    ]


def test_history_answers_keep_their_end_of_turn_when_the_chat_ends_with_eos():
    specials = dict(specials=["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>"],
                    bos="<|endoftext|>", eos="<|endoftext|>")  # fmt: skip
    tok = make_tokenizer(EOS_AT_THE_END, **specials)
    c = conv(
        ("user", "Hi"), ("assistant", "Fine, thanks."), ("user", "Bye"), ("assistant", "See you")
    )
    enc = encode(c, tok, EOS_AT_THE_END)
    assert enc.input_ids == reference_ids(tok, c, EOS_AT_THE_END)
    assert trained_runs(tok, enc)[0] == "Fine, thanks.<|end|>"


def test_history_answer_without_its_think_block_is_found():
    tok = make_tokenizer(QWEN3_THINK, **CHATML_SPECIALS)
    c = conv(("user", "Hi"), ("assistant", "<think>\nhm\n</think>\n\nHello there"),
             ("user", "Bye"), ("assistant", "See you"))  # fmt: skip
    enc = encode(c, tok, QWEN3_THINK)
    assert enc.input_ids == reference_ids(tok, c, QWEN3_THINK)
    assert trained_runs(tok, enc) == ["Hello there<|im_end|>", "See you<|im_end|>"]


@pytest.mark.parametrize("content", ["end", "d", "im", "_", "|", "user"])
def test_a_turn_whose_text_is_part_of_the_markup_is_found_in_its_place(content):
    """Content that also occurs in the end-of-turn token or the role header: trained where
    it is, with its end-of-turn."""
    tok = make_tokenizer(BUILTIN_TEMPLATES["chatml"], **CHATML_SPECIALS)
    c = Conversation(turns=[Turn("user", content, True), Turn("assistant", "Hello there")],
                     source="x:1")  # fmt: skip
    runs = trained_runs(tok, encode(c, tok, BUILTIN_TEMPLATES["chatml"]))
    assert runs == [f"{content}<|im_end|>", "Hello there<|im_end|>"]
    specials = dict(specials=["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>"],
                    bos="<|endoftext|>", eos="<|endoftext|>")  # fmt: skip
    phi = make_tokenizer(EOS_AT_THE_END, **specials)
    runs = trained_runs(phi, encode(c, phi, EOS_AT_THE_END))
    assert runs[0] == f"{content}<|end|>"


def test_a_trained_first_user_turn_does_not_train_the_default_system_prompt():
    tok = make_tokenizer(CHATML_SYSTEM, **CHATML_SPECIALS)
    c = Conversation(turns=[Turn("user", "Hi", True), Turn("assistant", "Hello")], source="x:1")
    runs = trained_runs(tok, encode(c, tok, CHATML_SYSTEM))
    assert runs == ["Hi<|im_end|>", "Hello<|im_end|>"]


def test_bpe_merge_across_the_boundary_uses_offsets(monkeypatch):
    tok = make_tokenizer(MISTRAL_MERGE, **MISTRAL_SPECIALS)
    c = conv(("user", "What is Paris?"), ("assistant", "capital of France"))
    prompt = tok.apply_chat_template(
        c.to_messages()[:1], add_generation_prompt=True, tokenize=False
    )
    full = tok.apply_chat_template(c.to_messages(), tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert f_ids[: len(p_ids)] != p_ids  # the case under test: " capital" is one token
    enc = encode(c, tok, MISTRAL_MERGE)
    assert enc.input_ids == f_ids
    assert trained_runs(tok, enc) == [" capital of France</s>"]  # the merged token is trained
    # A tokenizer without offsets cannot resolve this: a clear error, not a wrong mask.
    monkeypatch.setattr(templates, "_offsets", lambda tok, text: None)
    with pytest.raises(TunelabError, match=r"data.jsonl:7.*fast tokenizer"):
        encode(c, tok, MISTRAL_MERGE)


def test_prefix_tokenization_path_matches_offsets(monkeypatch, named_tokenizer):
    _, tok = named_tokenizer
    template = resolve_template(tok, None)
    fast = encode(DIALOGUE, tok, template)
    monkeypatch.setattr(templates, "_offsets", lambda tok, text: None)
    assert encode(DIALOGUE, tok, template) == fast


def test_mask_history_train_on_prompt_and_turn_overrides(chatml_tok):
    tok, t = chatml_tok, BUILTIN_TEMPLATES["chatml"]
    last_only = encode(DIALOGUE, tok, t, mask_history=True)
    assert trained_runs(tok, last_only) == ["Rome 🇮🇹 is.<|im_end|>"]
    everything = encode(DIALOGUE, tok, t, train_on_prompt=True)
    assert everything.labels == everything.input_ids
    c = conv(("user", "Hi"), ("assistant", "Hello there"), ("user", "Bye"), ("assistant", "Ok"))
    c.turns[0].train, c.turns[3].train = True, False
    assert trained_runs(tok, encode(c, tok, t)) == [
        "Hi<|im_end|>",  # a trained user turn: its content and end-of-turn, as an answer
        "Hello there<|im_end|>",
    ]
    c.turns[0].train = None
    masked = encode(c, tok, t, train_on_prompt=True)
    text = tok.decode(masked.input_ids)
    # Everything but the answer marked train=False; the newline after it stays trained.
    assert trained_runs(tok, masked) == [text[: text.rindex("Ok")], "\n"]


def test_empty_answer_trains_the_end_of_turn(chatml_tok):
    c = conv(("user", ""), ("assistant", ""))
    enc = encode(c, chatml_tok, BUILTIN_TEMPLATES["chatml"])
    assert trained_runs(chatml_tok, enc) == ["<|im_end|>"]
    qwen3 = make_tokenizer(QWEN3_LIKE, **CHATML_SPECIALS)
    c = conv(("user", "Hi"), ("assistant", ""), ("user", "Bye"), ("assistant", "Ok"))
    runs = trained_runs(qwen3, encode(c, qwen3, QWEN3_LIKE))
    # the empty history answer trains its end-of-turn, as history answers with text do
    assert runs == ["<|im_end|>", "<think>\n\n</think>\n\nOk<|im_end|>"]


def test_plain_text_appends_eos_and_trains_everything(chatml_tok):
    enc = encode(Conversation(text="hello world", source="t:1"), chatml_tok, "unused")
    assert enc.input_ids[-1] == chatml_tok.eos_token_id
    assert enc.labels == enc.input_ids
    assert chatml_tok.decode(enc.input_ids) == "hello world<|im_end|>"


def test_preference_encodes_the_chosen_path(chatml_tok):
    c = conv(("user", "Hi"), ("assistant", "Hello there"), rejected="Go away")
    enc = encode(c, chatml_tok, BUILTIN_TEMPLATES["chatml"])
    assert trained_runs(chatml_tok, enc) == ["Hello there<|im_end|>"]
    assert "Go away" not in chatml_tok.decode(enc.input_ids)


def test_truncation_drop_and_no_target(chatml_tok):
    t = BUILTIN_TEMPLATES["chatml"]
    full = encode(DIALOGUE, chatml_tok, t)
    n = len(full.input_ids)
    cut = encode(DIALOGUE, chatml_tok, t, max_length=n - 2)
    assert cut.truncated and cut.input_ids == full.input_ids[: n - 2]
    assert cut.labels == full.labels[: n - 2]
    assert encode_or_skip(DIALOGUE, chatml_tok, t, max_length=n - 2, truncation="drop") == (
        SKIP_TOO_LONG
    )
    assert encode(DIALOGUE, chatml_tok, t, max_length=n - 2, truncation="drop") is None
    first_answer = full.labels.index(next(x for x in full.labels if x != IGNORE_INDEX))
    assert encode_or_skip(DIALOGUE, chatml_tok, t, max_length=first_answer) == SKIP_NO_TARGET
    assert encode(conv(("user", "Hi")), chatml_tok, t) is None  # nothing to train
    assert encode(Conversation(source="e:1"), chatml_tok, t) is None
    with pytest.raises(TunelabError, match="truncation"):
        encode(DIALOGUE, chatml_tok, t, truncation="cut")


def test_builtin_templates_mask_answers(chatml_tok):
    c = conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello there"))
    expected = {
        "chatml": "Hello there<|im_end|>",
        "llama-2": " Hello there <|im_end|>",
        "alpaca": "Hello there<|im_end|>",
        "plain": "Hello there<|im_end|>",
    }
    for name, answer in expected.items():
        template = resolve_template(chatml_tok, name)
        enc = encode(c, chatml_tok, template)
        assert enc.input_ids == reference_ids(chatml_tok, c, template), name
        assert trained_runs(chatml_tok, enc) == [answer], name
        text = chatml_tok.decode(enc.input_ids)
        assert "Be brief." in text and "Hi" in text, name


def test_resolve_template():
    tok = make_tokenizer(None, **CHATML_SPECIALS)
    with pytest.raises(TunelabError, match=r"data.template: chatml"):
        resolve_template(tok, None)
    assert resolve_template(tok, "alpaca") == BUILTIN_TEMPLATES["alpaca"]
    assert resolve_template(tok, MISTRAL_LIKE) == MISTRAL_LIKE
    with pytest.raises(TunelabError, match=r"unknown data\.template 'vicuna'"):
        resolve_template(tok, "vicuna")
    tok.chat_template = {"default": CHATML_SYSTEM, "tool_use": QWEN3_LIKE}
    assert resolve_template(tok, None) == CHATML_SYSTEM
    assert resolve_template(tok, "tool_use") == QWEN3_LIKE


def test_render_error_names_the_example(chatml_tok):
    strict = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}"
        "{% endif %}" + BUILTIN_TEMPLATES["chatml"]
    )
    with pytest.raises(TunelabError, match=r"bad.jsonl:3.*must start with user"):
        encode(conv(("assistant", "Hi"), source="bad.jsonl:3"), chatml_tok, strict)


def test_parity_mismatch_names_the_example(monkeypatch, chatml_tok):
    original = chatml_tok.apply_chat_template

    def tokenized_differently(messages, **kw):
        out = original(messages, **kw)
        if kw.get("tokenize"):
            out["input_ids"] = [*out["input_ids"], 0]
        return out

    monkeypatch.setattr(chatml_tok, "apply_chat_template", tokenized_differently)
    with pytest.raises(TunelabError, match=r"data.jsonl:7.*apply_chat_template"):
        encode(DIALOGUE, chatml_tok, BUILTIN_TEMPLATES["chatml"])
    assert encode(DIALOGUE, chatml_tok, BUILTIN_TEMPLATES["chatml"], verify=False) is not None


def test_default_model_tokenizer():
    from tunelab.hub import resolve_model
    from tunelab.models.loading import load_tokenizer

    tok = load_tokenizer(resolve_model("default"))
    template = resolve_template(tok, None)
    c = conv(("user", "Hi"), ("assistant", "Hello there"), ("user", "Bye"), ("assistant", "Ok"))
    for example in (c, DIALOGUE):
        enc = encode(example, tok, template)
        assert enc.input_ids == reference_ids(tok, example, template)
    assert "SmolLM" in tok.decode(encode(c, tok, template).input_ids)  # its default system
    assert trained_runs(tok, encode(c, tok, template)) == [
        "Hello there<|im_end|>",
        "Ok<|im_end|>",
    ]
    assert trained_runs(tok, encode(DIALOGUE, tok, template, mask_history=True)) == [
        "Rome 🇮🇹 is.<|im_end|>"
    ]
