"""The tokenizer the package ships: byte-level BPE built with `tokenizers`, digits split one per token.

`python -m k15.models.tokenizer` rebuilds k15/models/tokenizer/tokenizer.json from the built-in
task's text; any Hugging Face tokenizer directory can be loaded instead.
"""

from __future__ import annotations

import random
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "tokenizer"
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS]


def build_tokenizer(vocab_size: int = 384, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from k15.data.arithmetic import direct_solution, generate_problems, worked_solution

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    problems = generate_problems(20000, seed=seed, min_ops=1, max_ops=8, max_value=99)
    rng = random.Random(seed)
    corpus = [p.prompt + (worked_solution(p) if rng.random() < 0.5 else direct_solution(p)) for p in problems]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def save_shipped_tokenizer(path: Path = SHIPPED_DIR) -> None:
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(path)


def load_tokenizer(path: str | Path | None = None):
    """Load a Hugging Face tokenizer directory; None means the shipped one."""
    from transformers import AutoTokenizer

    path = Path(path) if path else SHIPPED_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


if __name__ == "__main__":
    save_shipped_tokenizer()
    tok = load_tokenizer()
    print(f"saved {SHIPPED_DIR} with {len(tok)} tokens")
