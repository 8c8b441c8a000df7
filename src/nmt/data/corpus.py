"""Corpus sources: local text files or Hugging Face datasets, behind ``read_split``. Monolingual
text (tasks lm and mlm) comes as pairs with one side empty, so it goes through the same cleaning,
encoding and cache as a parallel corpus."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from nmt.config import Config, DataConfig
from nmt.errors import NMTError

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "valid", "test")


CHUNK = 20_000  # pairs per streamed chunk: bounds the Python strings held at once
READ_BLOCK = 1 << 20  # bytes per read of a local corpus file

Chunk = tuple[list[str], list[str]]  # a training chunk may hold None: see _iter_local
Side = Literal["src", "tgt"] | None  # the side monolingual text goes to; None: a parallel corpus

MONO_SIDE: dict[str, Side] = {"translation": None, "lm": "tgt", "mlm": "src"}


def mono_side(cfg: Config) -> Side:
    """Where ``cfg.task`` puts its monolingual text: lm on the target side (a decoder-only model
    then reads ``</s> <s> text``), mlm on the source side; None for translation."""
    return MONO_SIDE[cfg.task]


def read_split(data_cfg: DataConfig, split: str, side: Side = None) -> tuple[list[str], list[str]]:
    """Aligned (source, target) lines of ``split`` ("train" | "valid" | "test"), all in memory:
    for the small validation and test splits; the training split goes through ``iter_split``."""
    src: list[str] = []
    tgt: list[str] = []
    for s, t in iter_split(data_cfg, split, side=side):
        src += s
        tgt += t
    return src, tgt


def iter_split(data_cfg: DataConfig, split: str, chunk: int = CHUNK, side: Side = None) -> Iterator[Chunk]:
    """Aligned (source, target) lines of ``split`` in chunks of at most ``chunk`` pairs, read as
    they are consumed: the corpus is never held whole. With ``side``, the monolingual text of
    ``data.lang`` on that side, the other side empty."""
    _check_split(split)
    if side is not None:
        return _as_pairs(_iter_mono(data_cfg, split, chunk), side)
    if data_cfg.dir:
        return _iter_local(data_cfg, split, chunk)
    if data_cfg.hf_name:
        dataset = load_hf_split(data_cfg, split)
        return iter_dataset_pairs(dataset, data_cfg.src_lang, data_cfg.tgt_lang, data_cfg.hf_name, chunk)
    raise NMTError("no corpus configured: set data.dir (local files) or data.hf_name (Hugging Face)")


def has_test(data_cfg: DataConfig, side: Side = None) -> bool:
    """A test split is configured (empty ``data.test`` / ``data.hf_test_split`` turns it off); a
    monolingual corpus of local files has one only where its test file exists (a language model
    is judged by its validation perplexity)."""
    if side is not None and data_cfg.dir and data_cfg.test:
        return _find_file(Path(data_cfg.dir), data_cfg.test, str(data_cfg.lang), must=False) is not None
    return bool(data_cfg.test if data_cfg.dir else data_cfg.hf_test_split)


def corpus_fingerprint(data_cfg: DataConfig, split: str, side: Side = None) -> str:
    """Hash identifying the inputs of ``split`` by what they hold, not where they are: the content
    of local files (the same corpus at another path or on another machine gets the same hash, a
    rewrite that keeps size and mtime another), or a Hub dataset's resolved revision."""
    _check_split(split)
    if data_cfg.dir:
        paths = [mono_path(data_cfg, split)] if side is not None else local_paths(data_cfg, split)
        parts: list[Any] = [file_hash(p) for p in paths]
    elif data_cfg.hf_name:
        parts = ["hf", data_cfg.hf_config, hf_split_name(data_cfg, split)]
        root = Path(data_cfg.hf_name)
        if root.exists():
            parts += [[str(p.relative_to(root)), file_hash(p)] for p in sorted(root.rglob("*")) if p.is_file()]
        else:
            parts += [data_cfg.hf_name, hub_revision(data_cfg.hf_name, data_cfg.hf_config)]
    else:
        raise NMTError("no corpus configured: set data.dir (local files) or data.hf_name (Hugging Face)")
    parts += [data_cfg.src_lang, data_cfg.tgt_lang] if side is None else ["mono", side, data_cfg.lang]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    """SHA-256 of the file's bytes, streamed (SHA-256 rather than BLAKE2: most CPUs hash it in
    hardware, which keeps a cache hit on a large corpus quick)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise NMTError(f"cannot read {path}: {e.strerror}") from None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ---------------------------------------------------------------- local files


def local_paths(data_cfg: DataConfig, split: str) -> tuple[Path, Path]:
    """Existing ``{dir}/{prefix}.{lang}`` (or ``.gz``) files of both sides; NMTError if missing."""
    prefix = getattr(data_cfg, split)
    return tuple(_find_file(Path(data_cfg.dir), prefix, lang)  # type: ignore[return-value]
                 for lang in (data_cfg.src_lang, data_cfg.tgt_lang))


def mono_path(data_cfg: DataConfig, split: str) -> Path:
    """The existing ``{dir}/{prefix}.{lang}`` (or ``.gz``) file of a monolingual split."""
    return _find_file(Path(str(data_cfg.dir)), getattr(data_cfg, split), str(data_cfg.lang))  # type: ignore[return-value]


def _find_file(directory: Path, prefix: str, lang: str, must: bool = True) -> Path | None:
    plain = directory / f"{prefix}.{lang}"
    for candidate in (plain, plain.with_name(plain.name + ".gz")):
        if candidate.is_file():
            return candidate
    if not must:
        return None
    raise NMTError(f"corpus file not found: {plain} (or {plain.name}.gz)")


def _iter_mono(data_cfg: DataConfig, split: str, chunk: int) -> Iterator[list[str]]:
    """Lines of the monolingual text of ``split`` in chunks (None for an unreadable training line,
    as in ``_iter_local``)."""
    if data_cfg.dir:
        lines = iter_lines(mono_path(data_cfg, split), data_cfg.max_line_bytes, refuse=split != "train")
        while block := list(itertools.islice(lines, chunk)):
            yield block  # type: ignore[misc]
    elif data_cfg.hf_name:
        yield from iter_dataset_text(load_hf_split(data_cfg, split), str(data_cfg.lang), data_cfg.hf_name, chunk)
    else:
        raise NMTError("no corpus configured: set data.dir (local files) or data.hf_name (Hugging Face)")


def _as_pairs(chunks: Iterator[list[str]], side: Side) -> Iterator[Chunk]:
    for text in chunks:
        empty = [""] * len(text)
        yield (text, empty) if side == "src" else (empty, text)


def _iter_local(data_cfg: DataConfig, split: str, chunk: int) -> Iterator[Chunk]:
    """Pairs of a local split. A line over ``data.max_line_bytes`` or with a NUL byte comes as None
    in the training split (its pair is dropped and counted by the cleaning) and is an error in the
    others."""
    src_path, tgt_path = local_paths(data_cfg, split)
    refuse = split != "train"
    src_lines = iter_lines(src_path, data_cfg.max_line_bytes, refuse)
    tgt_lines = iter_lines(tgt_path, data_cfg.max_line_bytes, refuse)
    done = 0
    while True:
        src = list(itertools.islice(src_lines, chunk))
        tgt = list(itertools.islice(tgt_lines, chunk))
        if len(src) != len(tgt):
            n_src = done + len(src) + sum(1 for _ in src_lines)
            n_tgt = done + len(tgt) + sum(1 for _ in tgt_lines)
            raise NMTError(f"line counts differ: {src_path} has {n_src} lines, {tgt_path} has {n_tgt}")
        if not src:
            return
        done += len(src)
        yield src, tgt


def read_lines(path: Path) -> list[str]:
    """UTF-8 lines of a plain or gzip file, without line endings (``\\r\\n`` too)."""
    return list(iter_lines(path))


def iter_lines(path: Path, max_bytes: int = 1 << 30, refuse: bool = True) -> Iterator[str | None]:
    """Lines of ``read_lines`` read lazily: only the current line is decoded and held, and never
    more than ``max_bytes`` of it. A longer line, or one with a NUL byte, is an error naming file
    and line when ``refuse``, else None."""
    try:
        f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise NMTError(f"cannot read {path}: {e}") from None
    with f:
        try:
            number = 0
            for lines, clean in _line_blocks(f, max_bytes):
                text = _decode_block(lines, first=number == 0) if clean else None
                if text is not None:
                    yield from text
                    number += len(lines)
                    continue
                for raw in lines:  # a block with an unreadable line: find it, name its number
                    number += 1
                    if raw is not None and b"\0" not in raw:
                        yield _decode_line(raw, path, number)
                    elif refuse:
                        raise NMTError(f"{path} line {number}: {_unreadable(raw, max_bytes)}")
                    else:
                        yield None
        except (OSError, EOFError, zlib.error) as e:  # a cut or corrupt .gz file among them
            raise NMTError(f"cannot read {path}: {e}") from None


def _line_blocks(f: IO[bytes], max_bytes: int) -> Iterator[tuple[list[bytes | None], bool]]:
    """The lines of ``f`` without their ``\\n``, a block of them per read, and whether all of the
    block's lines are readable. Binary lines end at ``b"\\n"`` only (str.splitlines would also split
    on ``\\x1c``, ``\\u2028`` ... and misalign the pairs). None stands for a line over ``max_bytes``,
    whose bytes are dropped as they are read instead of being held."""
    carry, long_line = b"", False
    while block := f.read(READ_BLOCK):
        *lines, rest = block.split(b"\n")
        if lines:
            lines[0] = None if long_line else carry + lines[0]
            clean = lines[0] is not None and max(map(len, lines)) <= max_bytes
            if not clean:
                lines = [None if raw is None or len(raw) > max_bytes else raw for raw in lines]
            yield lines, clean and b"\0" not in block and b"\0" not in carry
            carry, long_line = rest, False
        elif not long_line:
            carry += rest
        if len(carry) > max_bytes:
            carry, long_line = b"", True
    if long_line or carry:
        yield [None if long_line else carry], not long_line and b"\0" not in carry


def _decode_block(lines: list[bytes], first: bool) -> list[str] | None:
    """``_decode_line`` of each line, decoded at once; None if a line is not valid UTF-8."""
    try:
        text = b"\n".join(lines).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if first:
        text = text.removeprefix("\ufeff")
    out = text.replace("\r\n", "\n").split("\n")
    out[-1] = out[-1].removesuffix("\r")
    return out


def _unreadable(raw: bytes | None, max_bytes: int) -> str:
    if raw is None:
        return f"longer than data.max_line_bytes={max_bytes} bytes (a file without newlines, or with \\r only?)"
    return "holds a NUL byte (a binary file?)"


def _decode_line(raw: bytes, path: Path, number: int) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NMTError(f"{path} line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    if number == 1:
        line = line.removeprefix("\ufeff")
    return line[:-1] if line.endswith("\r") else line


# ---------------------------------------------------------------- Hugging Face datasets


def hf_split_name(data_cfg: DataConfig, split: str) -> str:
    return {"train": data_cfg.hf_train_split, "valid": data_cfg.hf_valid_split,
            "test": data_cfg.hf_test_split}[split]


def load_hf_split(data_cfg: DataConfig, split: str) -> datasets.Dataset:
    """The Dataset of ``split``: from a ``save_to_disk`` folder, a local data folder, or the Hub."""
    import datasets

    name, split_name = data_cfg.hf_name, hf_split_name(data_cfg, split)
    assert name is not None
    path = Path(name)
    if path.is_dir() and _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.Dataset):
            return loaded  # a single saved Dataset serves every split
        if split_name not in loaded:
            raise NMTError(f"dataset {name} has no split '{split_name}'; available: {', '.join(loaded)}")
        return loaded[split_name]
    return _load_dataset(name, data_cfg.hf_config, split_name)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_dataset(name: str, config: str | None, split_name: str) -> datasets.Dataset:
    import datasets

    with _hub_errors(name):
        return datasets.load_dataset(name, config, split=split_name)


def hub_revision(name: str, config: str | None) -> str:
    """The commit of the Hub dataset ``name`` that loading it now would read (the cached one when
    offline)."""
    import datasets

    with _hub_errors(name):
        return str(datasets.load_dataset_builder(name, config).hash)


@contextlib.contextmanager
def _hub_errors(name: str) -> Iterator[None]:
    """The Hub's and datasets' failures as one-line errors."""
    import datasets

    try:
        yield
    except datasets.exceptions.DatasetNotFoundError:
        raise NMTError(f"Hugging Face dataset '{name}' not found") from None
    except ValueError as e:
        # unknown split or config: datasets lists the valid choices in its message
        raise NMTError(f"dataset {name}: {str(e).splitlines()[0]}") from None
    except Exception as e:
        if _is_network_error(e):
            raise NMTError(
                f"cannot reach the Hugging Face Hub for '{name}'; use data.dir with local files"
            ) from None
        raise


def _is_network_error(error: BaseException) -> bool:
    """Connection/offline errors of datasets, huggingface_hub, requests or httpx (by class name,
    so that none of those libraries has to be imported to recognise them)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    markers = ("Connect", "Timeout", "Offline", "LocalEntryNotFound")
    return any(m in cls.__name__ for cls in type(error).__mro__ for m in markers)


def dataset_pairs(
    dataset: datasets.Dataset, src_lang: str, tgt_lang: str, name: str = "dataset"
) -> tuple[list[str], list[str]]:
    """(source, target) lines of a Dataset with a ``translation`` dict column or per-language columns."""
    src: list[str] = []
    tgt: list[str] = []
    for s, t in iter_dataset_pairs(dataset, src_lang, tgt_lang, name):
        src += s
        tgt += t
    return src, tgt


def iter_dataset_pairs(dataset: datasets.Dataset, src_lang: str, tgt_lang: str,
                       name: str = "dataset", chunk: int = CHUNK) -> Iterator[Chunk]:
    """``dataset_pairs`` in chunks of ``chunk`` rows: the Arrow data stays memory-mapped and only
    the current chunk becomes Python strings."""
    columns = dataset.column_names
    translation = "translation" in columns and src_lang not in columns
    if translation:
        kind = dataset.features["translation"]
        available = list(getattr(kind, "languages", None) or kind)
        _check_langs(name, (src_lang, tgt_lang), available, "languages")
    else:
        _check_langs(name, (src_lang, tgt_lang), columns, "columns")
    for table in dataset.with_format("arrow").iter(batch_size=chunk):  # pyarrow.Table
        if translation:
            column = table.column("translation").combine_chunks()
            src, tgt = column.field(src_lang), column.field(tgt_lang)
        else:
            src, tgt = table.column(src_lang), table.column(tgt_lang)
        yield _strings(src), _strings(tgt)


def iter_dataset_text(dataset: datasets.Dataset, lang: str, name: str = "dataset",
                      chunk: int = CHUNK) -> Iterator[list[str]]:
    """Monolingual lines of a Dataset: its ``text`` column, else one side of a parallel corpus
    (the ``lang`` column, or the ``lang`` entry of a ``translation`` column), in chunks of
    ``chunk`` rows."""
    columns = dataset.column_names
    column = next((c for c in ("text", lang) if c in columns), None)
    if column is None:
        if "translation" not in columns:
            raise NMTError(f"dataset {name} has no 'text', '{lang}' or 'translation' column; "
                           f"available columns: {', '.join(columns)}")
        kind = dataset.features["translation"]
        _check_langs(name, (lang,), list(getattr(kind, "languages", None) or kind), "languages")
    for table in dataset.with_format("arrow").iter(batch_size=chunk):  # pyarrow.Table
        if column is not None:
            yield _strings(table.column(column))
        else:
            yield _strings(table.column("translation").combine_chunks().field(lang))


def _check_langs(name: str, langs: tuple[str, ...], available: list[str], what: str) -> None:
    for lang in langs:
        if lang not in available:
            raise NMTError(
                f"language '{lang}' not in dataset {name}; available {what}: {', '.join(available)}"
            )


def _strings(column: Any) -> list[str]:
    return [s if s is not None else "" for s in column.to_pylist()]
