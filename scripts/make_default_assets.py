#!/usr/bin/env python3
"""Generate sftplug's bundled default assets (dataset + tokenizer).

Writes into ``sftplug/assets/`` (or ``--out DIR``):

* ``default_train.jsonl`` / ``default_eval.jsonl`` -- prompt/completion pairs from
  a handful of simple rule-based task families, so a tiny model can learn them
  in a couple of minutes and the held-out set holds new instances of the same rules.
* ``tokenizer.json`` / ``tokenizer_config.json`` -- a 1024-token byte-level BPE
  tokenizer trained on the training texts, with a chat template.

Everything is deterministic: rerunning reproduces the files byte for byte.
"""

import argparse
import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN_PER_FAMILY = 375  # 8 families -> 3000 training records
N_EVAL_PER_FAMILY = 25  # 8 families -> 200 eval records
SAMPLE_PROMPT = "Count from 4 to 9."  # first eval record, shown before/after training

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# ---------------------------------------------------------------- word tables

NOUNS = """ant apple arm bag ball banana bed bell bike bird boat book bottle bug cake
car card cat chair cloud coat coin cookie cow crab cup desk dog door dream drum
duck egg eye fan farm flag flower fork frog game garden gate gift girl goat hand
hat hill horse house jacket key kite king lake lamp lemon letter lion map moon
nail nest net note owl pan park pen pencil piano pig plane plate pot queen rabbit
rat ring river road rock rose seed ship shirt shoe snake sock song spoon star
stone table tent tiger tool town toy train tree truck van wall wave window wing
worm yard zebra basket bucket button candle castle clock dragon feather forest
hammer island kettle ladder magnet mirror monkey needle oven parrot pillow planet
pocket robot rocket shell spider sword ticket tower tunnel wagon whale wheel""".split()

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"),
    ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("new", "old"),
    ("full", "empty"), ("hard", "soft"), ("high", "low"), ("early", "late"),
    ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("clean", "dirty"),
    ("loud", "quiet"), ("long", "short"), ("thick", "thin"), ("in", "out"),
    ("left", "right"), ("top", "bottom"), ("day", "night"), ("push", "pull"),
    ("win", "lose"), ("buy", "sell"), ("give", "take"), ("true", "false"),
    ("first", "last"), ("near", "far"), ("inside", "outside"), ("before", "after"),
    ("good", "bad"), ("love", "hate"), ("always", "never"), ("front", "back"),
    ("start", "finish"), ("sweet", "sour"), ("wide", "narrow"), ("deep", "shallow"),
]

COLOURS = [
    ("a banana", "yellow"), ("a lemon", "yellow"), ("the sun", "yellow"),
    ("butter", "yellow"), ("grass", "green"), ("a frog", "green"),
    ("a lime", "green"), ("a cucumber", "green"), ("the sky", "blue"),
    ("the sea", "blue"), ("a blueberry", "blue"), ("snow", "white"),
    ("milk", "white"), ("salt", "white"), ("sugar", "white"), ("a cloud", "white"),
    ("coal", "black"), ("a crow", "black"), ("ink", "black"), ("the night", "black"),
    ("a tomato", "red"), ("a strawberry", "red"), ("a cherry", "red"),
    ("blood", "red"), ("a ruby", "red"), ("an orange", "orange"),
    ("a carrot", "orange"), ("a pumpkin", "orange"), ("chocolate", "brown"),
    ("coffee", "brown"), ("mud", "brown"), ("a bear", "brown"), ("a plum", "purple"),
    ("a grape", "purple"), ("a violet", "purple"), ("a flamingo", "pink"),
    ("a pig", "pink"), ("an elephant", "grey"), ("a mouse", "grey"), ("ash", "grey"),
]

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = """January February March April May June July August September October
November December""".split()

# ------------------------------------------------------------- task families
# Each family returns every (prompt, completion) pair it can produce.


def count_family():
    templates = ["Count from {a} to {b}.", "Please count from {a} to {b}.",
                 "List the numbers from {a} to {b}."]
    pairs = []
    for a in range(1, 41):
        for n in range(3, 8):
            b = a + n - 1
            answer = ", ".join(str(i) for i in range(a, b + 1)) + "."
            pairs += [(t.format(a=a, b=b), answer) for t in templates]
    return pairs


def repeat_family():
    templates = ["Repeat the word {w} {n} times.", "Say the word {w} {n} times.",
                 "Write the word {w} {n} times."]
    return [(t.format(w=w, n=n), f"Here is the word {w} {n} times: " + " ".join([w] * n) + ".")
            for w in NOUNS for n in range(2, 6) for t in templates]


def add_family():
    templates = ["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?"]
    return [(t.format(a=a, b=b), f"{a} plus {b} is {a + b}.")
            for a in range(31) for b in range(1, 10) for t in templates]


def opposite_family():
    templates = ["What is the opposite of the word {w}?", "Give me the opposite of the word {w}.",
                 "Tell me the opposite of {w}, please."]
    both_ways = OPPOSITES + [(b, a) for a, b in OPPOSITES]
    return [(t.format(w=w), f"The opposite of {w} is {o}.")
            for w, o in both_ways for t in templates]


def next_family():
    templates = {"after": ["What {k} comes after {x}?", "Which {k} follows right after {x}?"],
                 "before": ["What {k} comes before {x}?", "Which {k} is just before {x}?"]}
    pairs = []
    for kind, items in [("day", DAYS), ("month", MONTHS)]:
        for i, x in enumerate(items):
            neighbours = {"after": items[(i + 1) % len(items)], "before": items[i - 1]}
            for rel, y in neighbours.items():
                pairs += [(t.format(k=kind, x=x), f"The {kind} that comes {rel} {x} is {y}.")
                          for t in templates[rel]]
    return pairs


def first_letter_family():
    templates = ["What is the first letter of {w}?", "Which letter does {w} start with?"]
    return [(t.format(w=w), f"The first letter of {w} is {w[0]}.")
            for w in NOUNS for t in templates]


def colour_family():
    templates = ["What colour is {x}?", "Tell me the colour of {x}, please."]
    return [(t.format(x=x), f"The colour of {x} is {c}.")
            for x, c in COLOURS for t in templates]


def plural_family():
    templates = ["What is the plural of the word {w}?", "Give me the plural of {w}, please."]
    return [(t.format(w=w), f"The plural of {w} is {w}s.") for w in NOUNS for t in templates]


FAMILIES = [count_family, repeat_family, add_family, opposite_family,
            next_family, first_letter_family, colour_family, plural_family]

# ------------------------------------------------------------------ dataset


def build_dataset(rng):
    """Per family: 25 pairs (unique prompts) go to eval, the others to train."""
    train, evals = [], []
    for family in FAMILIES:
        pairs = family()
        rng.shuffle(pairs)
        pairs.sort(key=lambda pair: pair[0] != SAMPLE_PROMPT)  # stable: sample first
        held, rest = pairs[:N_EVAL_PER_FAMILY], pairs[N_EVAL_PER_FAMILY:]
        evals += held
        # Cycle through the remaining pairs; small families repeat some of them.
        train += [rest[i % len(rest)] for i in range(N_TRAIN_PER_FAMILY)]
    rng.shuffle(train)
    rng.shuffle(evals)
    # The trainer shows the first eval record's answer before and after training.
    evals.sort(key=lambda pair: pair[0] != SAMPLE_PROMPT)
    return ([{"prompt": p, "completion": c} for p, c in train],
            [{"prompt": p, "completion": c} for p, c in evals])


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- tokenizer


def render_chat(record):
    """The text the chat template produces for one record."""
    return (f"<|bos|><|user|>\n{record['prompt']}\n"
            f"<|assistant|>\n{record['completion']}<|eos|>\n")


def train_tokenizer(records):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,  # added first, so they get ids 0..5
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Train on the rendered chat texts, cut at the special tokens so that no
    # merges are wasted on pieces of "<|...|>".
    texts = []
    for r in records:
        text = render_chat(r)
        for special in SPECIAL_TOKENS:
            text = text.replace(special, "\0")
        texts += [piece for piece in text.split("\0") if piece]
    tok.train_from_iterator(texts, trainer=trainer)
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i, special
    return tok


def tokenizer_config():
    return {
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------- main


def generate(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, evals = build_dataset(random.Random(SEED))
    write_jsonl(out / "default_train.jsonl", train)
    write_jsonl(out / "default_eval.jsonl", evals)
    train_tokenizer(train).save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(tokenizer_config(), f, indent=2)
        f.write("\n")
    return train, evals


def main():
    default_out = Path(__file__).resolve().parent.parent / "sftplug" / "assets"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(default_out), help="output directory")
    args = parser.parse_args()
    train, evals = generate(args.out)
    print(f"wrote {len(train)} train and {len(evals)} eval records to {args.out}")


if __name__ == "__main__":
    main()
