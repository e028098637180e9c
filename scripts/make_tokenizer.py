"""Train the small byte-level BPE tokenizer bundled with mla_plugin's tiny models.

Seeded by construction (BPE training is deterministic for a given text and settings).
Trained on the wikitext-2 *validation* tokens only; never on the test split.

    python scripts/make_tokenizer.py ../shared/data/wikitext-2/valid.tokens.txt
"""

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", type=Path, help="training text (wikitext-2 valid.tokens.txt)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument(
        "--out", type=Path,
        default=Path(__file__).resolve().parents[1] / "mla_plugin/fixtures/assets/tokenizer.json",
    )
    args = parser.parse_args()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train([str(args.text)], trainer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out))
    print(f"wrote {args.out} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
