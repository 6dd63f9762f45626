"""The tokenizer wrapper: chat templates (built-in, file, sandboxed), spans, token masks."""

import json
import shutil

import pytest

from sftplug.config import ASSETS
from sftplug.data.chat_templates import BUILTIN_TEMPLATES, ChatTemplateError, resolve_chat_template
from sftplug.data.tokenizer import Tokenizer
from sftplug.errors import SftplugError

CHAT = [
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And another?"},
    {"role": "assistant", "content": "Blue."},
]


def saved(folder, chat_template, jinja=True):
    """The bundled tokenizer saved by transformers with ``chat_template`` (None, a string or {name: template});
    ``jinja=False``: the layout before transformers 5, the templates in tokenizer_config.json."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(ASSETS)
    hf.chat_template = chat_template
    hf.save_pretrained(folder, save_jinja_files=jinja)
    return folder


def hf_render(folder, messages=CHAT[:2], **options):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False, **options)


def tagged(tag):
    """A template that shows which one rendered."""
    return "{% for m in messages %}" + tag + "{{ m.content }}|{% endfor %}"


def edit_config(folder, **changes):
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def bare_folder(tmp_path):
    """The bundled tokenizer saved by transformers without a chat template."""
    return saved(tmp_path / "model", None)


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
    with pytest.raises(SftplugError, match="the folder has no default chat template"):
        resolve_chat_template(str(tmp_path))
    shutil.copy(ASSETS / "tokenizer.json", tmp_path)
    config.write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(SftplugError, match="tokenizer_config.json: chat_template must be a string or a list"):
        Tokenizer(tmp_path)


# -- which template a Tokenizer uses ---------------------------------------------------
def test_model_template_is_used(tok):
    assert tok.template_source == "tokenizer_config.json"
    assert tok.render(CHAT[:2]) == "<|bos|><|user|>\nName a color.\n<|assistant|>\nRed.<|eos|>\n"
    assert tok.render(CHAT[:1], add_generation_prompt=True).endswith("<|assistant|>\n")


def test_builtin_template_when_the_model_has_none(bare_folder, tok):
    bare = Tokenizer(bare_folder)
    assert "built-in 'sftplug'" in bare.template_source
    assert f"{bare_folder} has no chat template" in bare.template_warning
    assert "built-in 'sftplug' template" in bare.template_warning
    assert bare.render(CHAT) == tok.render(CHAT)
    bare.set_chat_template("chatml")  # chosen: no warning
    assert bare.template_warning is None


# -- where a model folder's template comes from: transformers' precedence ---------------------
NAMED = {"default": tagged("D"), "tool_use": tagged("T")}


@pytest.mark.parametrize("template, jinja, source", [
    (tagged("J"), True, "chat_template.jinja"),  # transformers 5's layout
    (NAMED, True, "chat_template.jinja"),  # tool_use in additional_chat_templates/
    (tagged("C"), False, "tokenizer_config.json"),  # the layout before transformers 5
    (NAMED, False, "tokenizer_config.json (named 'default')"),  # a list of {name, template}
], ids=["jinja", "jinja-and-named", "config", "config-named"])  # fmt: skip
def test_the_model_template_is_the_one_transformers_renders(tmp_path, template, jinja, source):
    folder = saved(tmp_path / "model", template, jinja)
    assert (folder / "chat_template.jinja").is_file() == jinja
    tok = Tokenizer(folder)
    assert tok.template_source == source and tok.template_warning is None
    assert tok.render(CHAT[:2]) == hf_render(folder)
    assert resolve_chat_template(str(folder)) == tok.chat_template  # --chat-template FOLDER reads it alike
    if isinstance(template, dict):  # a named one, as apply_chat_template(chat_template=NAME) takes it
        tok.set_chat_template("tool_use")
        assert tok.template_source == ("additional_chat_templates/tool_use.jinja" if jinja
                                       else "tokenizer_config.json (named 'tool_use')")
        assert tok.render(CHAT[:2]) == hf_render(folder, chat_template="tool_use") == "TName a color.|TRed.|"


def test_template_files_beat_tokenizer_config(tmp_path):
    folder = saved(tmp_path / "model", tagged("J"))
    edit_config(folder, chat_template=tagged("C"))  # a stale copy, as sftplug's export used to leave
    tok = Tokenizer(folder)
    assert tok.template_source == "chat_template.jinja"
    assert tok.render(CHAT[:2]) == hf_render(folder) == "JName a color.|JRed.|"


def test_named_templates_without_a_default_are_refused_until_one_is_chosen(tmp_path):
    from transformers import AutoTokenizer

    folder = saved(tmp_path / "model", {"tool_use": tagged("T"), "rag": tagged("R")})
    edit_config(folder, chat_template=tagged("C"))  # ignored beside template files, by transformers too
    with pytest.raises(ValueError, match="no default"):
        AutoTokenizer.from_pretrained(folder).apply_chat_template(CHAT[:2], tokenize=False)
    tok = Tokenizer(folder)
    with pytest.raises(SftplugError, match=r"\(rag, tool_use\) have none named 'default'.*--chat-template NAME"):
        tok.render(CHAT[:2])
    tok.set_chat_template("rag")
    assert tok.template_source == "additional_chat_templates/rag.jinja"
    assert tok.render(CHAT[:2]) == hf_render(folder, chat_template="rag") == "RName a color.|RRed.|"


def test_a_processors_chat_template_json_counts_where_the_tokenizer_has_none(tmp_path):
    folder = saved(tmp_path / "model", None)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": tagged("P")}))  # a processor's file
    tok = Tokenizer(folder)
    assert tok.template_source == "chat_template.json" and tok.template_warning is None
    assert tok.render(CHAT[:2]) == "PName a color.|PRed.|"
    edit_config(folder, chat_template=tagged("C"))  # the tokenizer's own comes first
    assert Tokenizer(folder).render(CHAT[:2]) == hf_render(folder) == "CName a color.|CRed.|"
    saved(folder, tagged("J"))
    assert Tokenizer(folder).render(CHAT[:2]) == hf_render(folder) == "JName a color.|JRed.|"


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
