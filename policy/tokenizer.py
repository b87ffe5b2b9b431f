"""Tokenizers: a tiny byte-level BPE trained in code (no download) or a local HF tokenizer.

Both carry the SPECIAL tokens as single ids, plus an eos and a pad token.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL: dict[str, str] = {
    "img_start": "<img_start>",
    "img": "<img>",
    "img_end": "<img_end>",
    "gen": "<gen>",
    "answer_start": "<answer>",
    "answer_end": "</answer>",
}
EOS = "<|endoftext|>"
PAD = "<|pad|>"
TINY_VOCAB = 512

_WORDS = """
the a an is are was of in on at to and or with without this that what which who where when why how
image picture photo scene object shape colour color size count number many few one two three four
five six seven eight nine ten zero left right top bottom middle center above below near far
red green blue yellow orange purple pink brown black white gray grey dark light bright
circle square triangle rectangle star cross line dot ring disk box ball cube
big small large tiny tall short round sharp blurry noisy dim clear degraded clean
question answer option choice correct wrong yes no true false
describe caption generate see look find tell show draw make there here it its
A B C D a b c d 0 1 2 3 4 5 6 7 8 9
""".split()


def _corpus() -> list[str]:
    """A small deterministic training corpus of words, phrases and question templates."""
    lines = [" ".join(_WORDS)]
    colours = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white"]
    shapes = ["circle", "square", "triangle", "rectangle", "star", "cross"]
    for c in colours:
        for s in shapes:
            lines.append(f"a {c} {s}. What colour is the {s}? The {s} is {c}.")
            lines.append(f"How many {s}s are there? There are 2 {c} {s}s in the image.")
    for q in ("What", "Which", "Where", "How many", "Is there"):
        lines.append(f"{q} object is in the image? Options: A. circle B. square C. triangle D. star")
    lines += [f"Answer: {x}" for x in "ABCD0123456789"]
    return lines


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the built-in corpus and wrap it (deterministic: same vocab every run)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS, PAD, *SPECIAL.values()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(SPECIAL.values()),
        clean_up_tokenization_spaces=False,
    )


def add_missing_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the SPECIAL tokens (and eos / pad when absent); returns how many tokens were added."""
    before = len(tokenizer)
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL.values() if t not in vocab]
    extra: dict = {}
    if missing:
        extra["extra_special_tokens"] = missing
    if tokenizer.eos_token is None:
        extra["eos_token"] = EOS
    if tokenizer.pad_token is None:
        extra["pad_token"] = PAD
    if extra:
        tokenizer.add_special_tokens(extra, replace_extra_special_tokens=False)
    return len(tokenizer) - before


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a local tokenizer (no network) and add any missing special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    add_missing_special_tokens(tokenizer)
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the SPECIAL tokens plus "eos" and "pad"; each special token must be a single id."""
    ids: dict[str, int] = {}
    for key, text in SPECIAL.items():
        enc = tokenizer.encode(text, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"special token {text!r} is not a single id: {enc}")
        ids[key] = enc[0]
    ids["eos"] = int(tokenizer.eos_token_id)
    ids["pad"] = int(tokenizer.pad_token_id)
    return ids
