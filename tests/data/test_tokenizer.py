"""The tokenizer wrapper: chat templates (built-in, file, sandboxed), spans, token masks."""

import json
import shutil

import pytest

from sftplug.config import ASSETS
from sftplug.data.tokenizer import BUILTIN_TEMPLATES, ChatTemplateError, Tokenizer, resolve_chat_template
from sftplug.errors import SftplugError

CHAT = [
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And another?"},
    {"role": "assistant", "content": "Blue."},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(ASSETS)


@pytest.fixture
def bare_folder(tmp_path):
    """The bundled tokenizer without a chat template in its tokenizer_config.json."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(ASSETS / "tokenizer.json", folder)
    config = json.loads((ASSETS / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# -- resolve_chat_template -------------------------------------------------------------
def test_resolve_builtin_names_and_none():
    assert resolve_chat_template(None) is None
    for name, source in BUILTIN_TEMPLATES.items():
        assert resolve_chat_template(name) == source


def test_resolve_file_config_folder_and_inline(tmp_path):
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert resolve_chat_template(str(jinja)) == jinja.read_text()
    own = json.loads((ASSETS / "tokenizer_config.json").read_text())["chat_template"]
    assert resolve_chat_template(str(ASSETS / "tokenizer_config.json")) == own
    assert resolve_chat_template(str(ASSETS)) == own  # a model folder
    assert resolve_chat_template("{{ messages[0].content }}") == "{{ messages[0].content }}"


def test_resolve_bad_values(tmp_path):
    with pytest.raises(SftplugError, match="no-such.jinja: no such file and not a built-in template"):
        resolve_chat_template(str(tmp_path / "no-such.jinja"))
    with pytest.raises(SftplugError, match="built-ins: sftplug, chatml"):
        resolve_chat_template("nonsense")
    empty = tmp_path / "empty.jinja"
    empty.write_text("")
    with pytest.raises(SftplugError, match="empty"):
        resolve_chat_template(str(empty))
    config = tmp_path / "tokenizer_config.json"
    config.write_text("{}")
    with pytest.raises(SftplugError, match="no chat_template"):
        resolve_chat_template(str(config))


# -- which template a Tokenizer uses ---------------------------------------------------
def test_model_template_is_used(tok):
    assert tok.template_source == "tokenizer_config.json"
    assert tok.render(CHAT[:2]) == "<|bos|><|user|>\nName a color.\n<|assistant|>\nRed.<|eos|>\n"
    assert tok.render(CHAT[:1], add_generation_prompt=True).endswith("<|assistant|>\n")


def test_builtin_template_when_the_model_has_none(bare_folder, tok):
    bare = Tokenizer(bare_folder)
    assert "built-in 'sftplug'" in bare.template_source
    assert bare.render(CHAT) == tok.render(CHAT)


def test_override_by_name_and_string(tok):
    chatml = Tokenizer(ASSETS, chat_template="chatml")
    assert chatml.template_source == "built-in 'chatml'"
    assert chatml.render(CHAT[:2]) == (
        "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
    )
    custom = Tokenizer(ASSETS, chat_template="{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert custom.template_source == "given"
    assert custom.render(CHAT[:2]) == "[Name a color.][Red.]"
    assert custom.fingerprint() != tok.fingerprint() != chatml.fingerprint()
    assert Tokenizer(ASSETS).fingerprint() == tok.fingerprint()


def test_set_chat_template(tmp_path, tok):
    t = Tokenizer(ASSETS)
    t.set_chat_template(None)
    assert t.template_source == "tokenizer_config.json"
    t.set_chat_template("chatml")
    assert t.template_source == "built-in 'chatml'" and t.render(CHAT[:1]).startswith("<|im_start|>user")
    assert t.fingerprint() != tok.fingerprint()
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}({{ m.content }}){% endfor %}")
    t.set_chat_template(str(jinja))
    assert t.template_source == f"--chat-template {jinja}" and t.render(CHAT[:2]) == "(Name a color.)(Red.)"
    with pytest.raises(SftplugError, match="no such file"):
        t.set_chat_template(str(tmp_path / "missing.jinja"))


# -- the sandbox and HF template conventions ---------------------------------------------
@pytest.mark.parametrize(
    "source, problem",
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{% set x = messages.append(1) %}x", "unsafe"),
        ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
    ],
)
def test_sandbox_and_raise_exception(source, problem):
    with pytest.raises(ChatTemplateError, match=problem):
        Tokenizer(ASSETS, chat_template=source).render(CHAT)


def test_hf_extensions_loopcontrols_generation_tojson():
    source = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}{{ messages[0] | tojson }}"
    )
    text = Tokenizer(ASSETS, chat_template=source).render(CHAT)
    assert text == 'Name a color.Red.{"role": "user", "content": "Name a color."}'


def test_bad_template_does_not_compile():
    with pytest.raises(SftplugError, match="does not compile"):
        Tokenizer(ASSETS, chat_template="{% for %}").render(CHAT)


# -- spans and masks -------------------------------------------------------------------
def test_render_spans_multi_turn(tok):
    [(text, spans)], without_eos = tok.render_spans(CHAT)
    assert [text[a:b] for a, b in spans] == ["Red.<|eos|>", "Blue.<|eos|>"]  # not the "\n" after EOS
    assert without_eos == 0
    [(text, spans)], _ = tok.render_spans(CHAT, train_on_prompt=True)
    assert spans == [(0, len(text))]
    [(text, spans)], _ = tok.render_spans(CHAT, train_turns="last")
    assert text == tok.render(CHAT) and [text[a:b] for a, b in spans] == ["Blue.<|eos|>"]


def test_render_spans_trailing_user_turn_is_rendered(tok):
    [(text, spans)], _ = tok.render_spans(CHAT[:3])
    assert text.endswith("<|user|>\nAnd another?\n")
    assert [text[a:b] for a, b in spans] == ["Red.<|eos|>"]


def test_template_without_eos_is_counted():
    source = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    [(text, spans)], without_eos = Tokenizer(ASSETS, chat_template=source).render_spans(CHAT)
    assert [text[a:b] for a, b in spans] == ["Red.\n", "Blue.\n"]
    assert without_eos == 2


def test_template_that_rewrites_earlier_turns_gives_one_example_per_turn():
    # Renders only the last assistant turn's content: earlier text changes as turns are added,
    # so each turn is trained in the context shown when it is generated.
    source = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<a>...{% else %}"
        "<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok = Tokenizer(ASSETS, chat_template=source)
    examples, without_eos = tok.render_spans(CHAT)
    assert [(text, [text[a:b] for a, b in spans]) for text, spans in examples] == [
        ("<user>Name a color.<assistant>Red.", ["Red."]),
        ("<user>Name a color.<a>...<user>And another?<assistant>Blue.", ["Blue."]),
    ]
    assert without_eos == 2  # this template ends turns with no EOS
    [(text, spans)], _ = tok.render_spans(CHAT + [{"role": "user", "content": "More?"}], train_turns="last")
    assert [text[a:b] for a, b in spans] == ["Blue."]  # the trailing turn rewrites "Blue.": it is left out
    assert text == "<user>Name a color.<a>...<user>And another?<assistant>Blue."


def test_turns_that_agree_share_an_example():
    # Rewrites the system line only once a second user turn arrives: turns 1 and 2 share the
    # first example's text only as far as their renders agree.
    source = (
        "{% set n = messages | selectattr('role', 'equalto', 'user') | list | length %}"
        "[{{ 'long' if n > 1 else 'short' }}]{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    chat = CHAT[:2] + [{"role": "assistant", "content": "Green."}] + CHAT[2:]
    examples, _ = Tokenizer(ASSETS, chat_template=source).render_spans(chat)
    assert [[text[a:b] for a, b in spans] for text, spans in examples] == [["Red.", "Green."], ["Blue."]]
    assert examples[1][0].startswith("[long]<user>Name a color.<assistant>Red.<assistant>Green.<user>")


def test_encode_masked_maps_spans_with_offsets(tok):
    text = "<|assistant|>\nYes 😀<|eos|>\n"
    a = text.index("Yes")
    b = text.index("<|eos|>") + len("<|eos|>")
    ids, trained, lengths = tok.encode_masked([text, "Hi"], [[(a, b)], []])
    assert lengths.tolist() == [len(tok.encode(text)), 2]
    tokens = [tok.backend.id_to_token(int(i)) for i in ids]
    # The emoji is four byte-level tokens sharing one character: all four are trained.
    assert list(zip(tokens, trained.tolist())) == [
        ("<|assistant|>", False), ("Ċ", False), ("Y", True), ("es", True), ("Ġ", True),
        ("ð", True), ("Ł", True), ("ĺ", True), ("Ģ", True), ("<|eos|>", True), ("Ċ", False),
        ("H", False), ("i", False),
    ]  # fmt: skip
