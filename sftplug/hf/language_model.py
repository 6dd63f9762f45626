"""Folders of a model with towers beside its language model (a vision tower, an audio tower):
sftplug trains the language model, leaves the towers out and says so, and exports the language
model as a folder of its own, which transformers loads as that text model.

The folder's config.json holds the language model's config as ``text_config``; its tensors are
stored under a prefix, as transformers 5 saves them (``model.language_model.``) or as the
published folders of the llava layout have them (``language_model.model.``, with
``language_model.lm_head.``).
"""

from __future__ import annotations

from sftplug.errors import SftplugError

# model_type of such a folder -> its towers, as the load description names them
LANGUAGE_MODEL_OF = {"qwen3_5": "vision tower", "qwen3_5_moe": "vision tower", "gemma3": "vision tower",
                     "mistral3": "Pixtral vision tower", "gemma4": "vision and audio towers"}
# where the language model's tensors are stored -> where the language model alone stores them
PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
            "language_model.lm_head.": "lm_head.", "lm_head.": "lm_head."}
# outer config.json keys that hold for the language model too, where its text_config does not say
CARRIED_KEYS = ("dtype", "torch_dtype", "quantization_config")


def language_model_config(hf: dict, where: str) -> dict:
    """A config.json's text_config as a config.json of its own (the tied embeddings are the outer
    config's, as transformers ties them), remembering the folder it came from."""
    text = hf.get("text_config")
    if not isinstance(text, dict) or "model_type" not in text:
        raise SftplugError(f"{where}: a {hf['model_type']} config without a text_config; sftplug trains its "
                           "language model")
    carried = {key: hf[key] for key in CARRIED_KEYS if key in hf}
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return {**carried, **text, "tie_word_embeddings": tie, "language_model_of": hf["model_type"]}


def language_model_name(stored: str) -> str | None:
    """The name the language model alone gives a stored tensor, or None for a tower's tensor."""
    for prefix, own in PREFIXES.items():
        if stored.startswith(prefix):
            return own + stored[len(prefix):]
    return None
