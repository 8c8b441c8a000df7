"""A small synthetic parallel corpus and config for the data preparation tests."""

from __future__ import annotations

import random
from pathlib import Path

from nmt.config import Config, DataConfig, TokenizerConfig

WORDS = "the a man woman dog cat runs sits on under red blue big small park street ball water".split()


def make_corpus(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    return src, [" ".join(w[::-1] + "q" for w in s.split()) for s in src]


def write_split(directory: Path, prefix: str, src: list[str], tgt: list[str]) -> None:
    (directory / f"{prefix}.en").write_text("".join(s + "\n" for s in src), encoding="utf-8")
    (directory / f"{prefix}.de").write_text("".join(t + "\n" for t in tgt), encoding="utf-8")


def make_cfg(tmp_path: Path, corpus: Path, **tokenizer) -> Config:
    return Config(run_dir=str(tmp_path / "run"),
                  data=DataConfig(dir=str(corpus), valid="val", test="test", max_len=100,
                                  max_len_ratio=5.0, cache_dir=str(tmp_path / "cache")),
                  tokenizer=TokenizerConfig(vocab_size=tokenizer.pop("vocab_size", 60), **tokenizer))


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in self)


def write_corpus(directory: Path, train_pairs: int) -> Path:
    """train/val/test_2016_flickr splits as configs/tiny.yaml expects (20 pairs in val and test)."""
    directory.mkdir()
    for prefix, n, seed in (("train", train_pairs, 0), ("val", 20, 1), ("test_2016_flickr", 20, 2)):
        write_split(directory, prefix, *make_corpus(n, seed))
    return directory
