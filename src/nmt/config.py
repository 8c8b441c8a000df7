"""Typed configuration: the dataclasses below are the only place where defaults live.

YAML files and ``key.sub=value`` overrides only replace fields; unknown keys and values of the
wrong type are rejected with a ``ConfigError`` that names the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nmt.errors import NMTError


class ConfigError(NMTError):
    """A user mistake in a config file or override (reported as a one-line error)."""


@dataclass
class DataConfig:
    src_lang: str = "en"
    """Source language code (file suffix of local corpora, column or dict key on the Hub)."""
    tgt_lang: str = "de"
    """Target language code."""
    lang: str | None = None
    """Tasks lm and mlm: the language of the monolingual text (required there, unset for
    translation): local files ``{dir}/{prefix}.{lang}[.gz]`` (a missing test file means no test
    split), or on the Hub a ``text`` column, else the ``lang`` column or the ``lang`` entry of a
    ``translation`` column (one side of a parallel corpus). The
    text becomes the target side of pairs with an empty source (lm) or the source side of pairs
    with an empty target (mlm); ``src_lang`` and ``tgt_lang`` are unused."""
    dir: str | None = None
    """Folder of local corpus files ``{dir}/{prefix}.{lang}[.gz]``; null means use ``hf_name``."""
    train: str = "train"
    """File prefix of the training split (local corpora)."""
    valid: str = "val"
    """File prefix of the validation split (local corpora)."""
    test: str = "test_2016_flickr"
    """File prefix of the test split (local corpora)."""
    hf_name: str | None = None
    """Hugging Face dataset name, e.g. ``bentrevett/multi30k`` or ``wmt14`` (used when ``dir`` is null)."""
    hf_config: str | None = None
    """Hugging Face dataset config, e.g. ``de-en`` for wmt14."""
    hf_train_split: str = "train"
    """Hub split name used for training."""
    hf_valid_split: str = "validation"
    """Hub split name used for validation."""
    hf_test_split: str = "test"
    """Hub split name used for testing."""
    max_len: int = 256
    """Training pairs with more subword tokens than this on either side are dropped; validation and
    test sentences are truncated to it for the loss (and counted). Must be < ``model.max_positions``."""
    max_len_ratio: float = 3.0
    """Training pairs whose token-length ratio (longer / shorter) exceeds this are dropped."""
    max_line_bytes: int = 1 << 20
    """Longest line read from a local corpus file, in bytes: a longer line (or one holding a NUL byte)
    drops its training pair (counted) and is an error naming file and line in the validation and
    test splits. Bounds the memory of reading a file without newlines (or with ``\\r`` only)."""
    max_valid_sentences: int = 0
    """Score validation BLEU on at most this many sentences (0 = all)."""
    cache_dir: str | None = None
    """Folder of the tokenized corpus caches shared by all runs (one subfolder per corpus, tokenizer
    and cleaning settings); null means ``$XDG_CACHE_HOME/nmt/data`` (``~/.cache/nmt/data``)."""


@dataclass
class TokenizerConfig:
    vocab_size: int = 8000
    """SentencePiece vocabulary size (per model when ``joint`` is false)."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece algorithm."""
    joint: bool = True
    """One model shared by source and target (needed for ``model.tie_embeddings``)."""
    character_coverage: float = 1.0
    """Fraction of characters covered by the vocabulary (0.9995 suits CJK)."""
    input_sentence_size: int = 2_000_000
    """Sentences sampled from the training split to train SentencePiece (0 = all); the sample is
    drawn while streaming, so the memory of training grows with this, not with the corpus."""
    sampled_segmentations: int = 0
    """Subword regularization (BPE-dropout): the training split is also encoded this many times (K)
    with merges dropped at random, both sides, each kept in the data cache; epoch e trains on
    sampled segmentation e mod K. 0 = off: one deterministic segmentation. Needs ``model_type:
    bpe``. Validation and test are never sampled. Pairs are kept or dropped by ``data.max_len``
    and ``data.max_len_ratio`` on the deterministic segmentation, so every epoch sees the same
    pairs; a side whose sample is longer than ``data.max_len`` keeps its deterministic one."""
    sampling_alpha: float = 0.1
    """With ``sampled_segmentations``: the probability that BPE-dropout drops each candidate merge,
    in (0, 1)."""
    text: Literal["task", "pair"] = "task"
    """The text SentencePiece is trained on, for task lm or mlm. task: the model's own monolingual
    text (``data.lang``). pair: both sides (``data.src_lang`` and ``data.tgt_lang``) of the
    parallel training split, as a translation run's joint tokenizer is, while the model still
    trains on ``data.lang`` only; a translator started from the checkpoint (``train.init_from``
    with ``train.init_vocab: parent``) then has one vocabulary for both languages. Needs a
    parallel corpus that includes ``data.lang``."""


@dataclass
class ModelConfig:
    arch: Literal["encoder_decoder", "decoder_only", "encoder_only"] = "encoder_decoder"
    """encoder_decoder: the paper's Transformer. decoder_only: one decoder stack without
    cross-attention (``decoder_layers`` layers; ``encoder_layers`` unused) reading ``source </s> <s>
    target`` as one sequence, trained on the target tokens only; it needs ``tokenizer.joint=true``,
    and ``model.max_positions`` covers source and target together (each side gets half).
    encoder_only: one encoder stack (``encoder_layers`` layers) with a token-prediction head, for
    ``task: mlm``."""
    source_attention: Literal["causal", "bidirectional"] = "causal"
    """decoder_only: how source positions attend to each other. causal: only to earlier ones (a
    plain language model over the pair); bidirectional: to the whole source (a prefix LM). Target
    positions are causal either way and see the whole source."""
    encoder_layers: int = 6
    """Number of encoder layers (N in the paper)."""
    decoder_layers: int = 6
    """Number of decoder layers."""
    d_model: int = 512
    """Model width; must be divisible by ``heads``."""
    heads: int = 8
    """Attention heads per multi-head attention block."""
    d_ff: int = 2048
    """Hidden width of the position-wise feed-forward network."""
    dropout: float = 0.1
    """Dropout on embeddings, sublayer outputs and (by default) attention weights."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    activation: Literal["relu", "gelu"] = "relu"
    """Feed-forward activation."""
    norm_first: bool = False
    """Pre-norm (true) or the paper's post-norm (false)."""
    tie_embeddings: bool = True
    """Share source, target and output embeddings (requires a joint vocabulary)."""
    max_positions: int = 1024
    """Longest sequence the positional encoding table covers."""


@dataclass
class TrainConfig:
    max_steps: int = 100_000
    """Total optimizer steps (counted across resumes)."""
    batch_tokens: int = 4096
    """Padded tokens per side in one batch, per process."""
    accum_steps: int = 1
    """Batches accumulated into one optimizer step."""
    lr: float = 0.0
    """Peak learning rate; 0 means the paper's d_model^-0.5 * warmup_steps^-0.5."""
    warmup_steps: int = 4000
    """Linear warmup steps before inverse-square-root decay."""
    adam_betas: tuple[float, float] = (0.9, 0.98)
    """Adam beta1, beta2."""
    adam_eps: float = 1e-9
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) when positive."""
    clip_norm: float = 0.0
    """Gradient norm clipping threshold (0 = off)."""
    label_smoothing: float = 0.1
    """Label smoothing epsilon."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision; fp16 uses a gradient scaler. auto: bf16 on CUDA GPUs that support it (fp16
    on older ones); bf16 on CPUs with native bf16 (AVX-512 BF16 or AMX) where a short probe finds it
    faster than fp32; fp32 otherwise. The choice and its reason are logged and written to config.yaml;
    checkpoints store the resolved value, which a resumed auto run keeps where it runs natively."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto picks CUDA when available."""
    seed: int = 1
    """Seed for parameters, dropout and batch order."""
    log_every: int = 100
    """Steps between log lines (and metrics.jsonl records)."""
    valid_every: int = 1000
    """Steps between validations (0 = only at the end)."""
    save_every: int = 1000
    """Steps between checkpoint saves."""
    keep_last: int = 5
    """Step checkpoints kept besides last.pt and best.pt (0 = none)."""
    keep_best: int = 0
    """Also keep the step checkpoints of the best this-many validations (by ``best_metric``), for
    ``nmt average --best``; needs ``valid_every`` to be a multiple of ``save_every`` (0 = none)."""
    patience: int = 0
    """Stop after this many validations without improvement (0 = never)."""
    best_metric: Literal["bleu", "loss"] = "bleu"
    """Validation metric that chooses best.pt. Tasks lm and mlm use loss whatever this says: they
    decode nothing on validation, so they have no BLEU."""
    valid_beam: int = 1
    """Beam size for validation BLEU (1 = greedy)."""
    init_from: str | None = None
    """Checkpoint whose model weights start a fresh run (fine-tuning); the init_* switches say what else is kept."""
    init_vocab: Literal["parent", "new"] = "parent"
    """With init_from: ``parent`` encodes this corpus with the parent's tokenizer (its tokenizer settings
    replace this config's); ``new`` trains a new tokenizer here and starts the embeddings and output
    projection afresh (their rows would mean other pieces), loading all other weights."""
    init_optimizer: bool = False
    """With init_from: also load the parent's optimizer state (Adam moments); off = fairseq's --reset-optimizer."""
    init_schedule: bool = False
    """With init_from: continue the learning-rate schedule where the parent stopped instead of warming up again."""
    init_step: bool = False
    """With init_from: continue the parent's step count (train.max_steps then includes the parent's steps)."""
    max_time_minutes: float = 0.0
    """Wall-clock budget for this invocation: stop (validate, save) after the step that passes it (0 = none)."""
    max_bad_steps: int = 20
    """Consecutive skipped steps (non-finite loss, OOM) after which training stops."""
    threads: int = 0
    """torch CPU threads (0 = leave torch's default)."""
    dist_timeout_minutes: float = 60.0
    """Under torchrun: how long a process waits for the others in a collective before the run fails.
    Covers what rank 0 does alone while the others wait (data preparation, validation with
    train.valid_beam); torch's default is 30 minutes for gloo and 10 for NCCL."""
    compile: bool = False
    """torch.compile the training forward and backward (one dynamic-shape graph; worth it on GPUs)."""
    tensorboard: bool = False
    """Also write the logged metrics as TensorBoard scalars under run_dir/tb (needs nmt[tensorboard])."""


@dataclass
class DecodeConfig:
    beam: int = 5
    """Beam size; 1 is greedy search."""
    lenpen: float = 1.0
    """GNMT length penalty alpha: scores divided by ((5 + len) / 6) ** alpha."""
    max_len_a: float = 1.5
    """Max output length is max_len_a * source_length + max_len_b."""
    max_len_b: int = 10
    """See max_len_a."""
    min_len: int = 1
    """Minimum output length (EOS is blocked before it)."""
    nbest: int = 1
    """Hypotheses returned per sentence."""
    no_repeat_ngram: int = 0
    """Block repeated n-grams of this size (0 = off)."""
    batch_tokens: int = 8000
    """Source tokens per translation batch."""


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Folder for the resolved config, data cache, tokenizer, checkpoints and metrics."""
    task: Literal["translation", "lm", "mlm"] = "translation"
    """translation: source -> target pairs. lm: language modelling of the monolingual text of
    ``data.lang`` (needs ``model.arch: decoder_only``; it reads ``</s> <s> text``: a decoder-only
    translator with an empty source); sample from it with ``nmt generate``. mlm: masked language
    modelling of that text (needs ``model.arch: encoder_only``); query it with ``nmt fill-mask``."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from the defaults), apply ``key.sub=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = from_dict(Config, raw, "")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain nested dict (e.g. stored in a checkpoint)."""
    cfg = from_dict(Config, raw, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML, JSON or torch.save."""
    return _plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config, path: str | Path, comment: str = "") -> None:
    """Write ``cfg`` as YAML; ``comment`` lines go first as ``# ...``."""
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    Path(path).write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def parse_override(item: str) -> tuple[str, Any]:
    """``train.lr=5e-4`` -> ("train.lr", 0.0005); values are parsed as YAML scalars."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``raw``, checking keys and types; prefix names the section."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        valid = ", ".join(fields)
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys of {where}: {valid}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` as type ``hint`` or raise ConfigError (ints widen to floats, nothing else)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"invalid value for {key}: {value!r}; choose one of: {choices}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} numbers, got {_describe(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, which reads "5e-4" (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {hint.__name__}, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def validate(cfg: Config) -> None:
    """Cross-field and range checks that types alone cannot express."""
    m, t, d, tok = cfg.model, cfg.train, cfg.decode, cfg.tokenizer
    checks = [
        (0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}"),
        (0.0 <= m.attention_dropout < 1.0, f"model.attention_dropout must be in [0, 1), got {m.attention_dropout}"),
        (m.encoder_layers >= 1 and m.decoder_layers >= 1, "model.encoder_layers and model.decoder_layers must be >= 1"),
        (m.d_model >= 1 and m.heads >= 1 and m.d_ff >= 1, "model.d_model, model.heads and model.d_ff must be >= 1"),
        (m.heads < 1 or m.d_model % m.heads == 0, f"model.d_model ({m.d_model}) must be divisible by model.heads ({m.heads})"),
        (not m.tie_embeddings or tok.joint, "model.tie_embeddings=true needs tokenizer.joint=true"),
        (cfg.data.max_line_bytes >= 1, f"data.max_line_bytes must be >= 1, got {cfg.data.max_line_bytes}"),
        (tok.vocab_size >= 8, f"tokenizer.vocab_size must be >= 8, got {tok.vocab_size}"),
        (0.0 < tok.character_coverage <= 1.0, "tokenizer.character_coverage must be in (0, 1]"),
        (tok.sampled_segmentations >= 0,
         f"tokenizer.sampled_segmentations must be >= 0, got {tok.sampled_segmentations}"),
        (0.0 < tok.sampling_alpha < 1.0, f"tokenizer.sampling_alpha must be in (0, 1), got {tok.sampling_alpha}"),
        (tok.sampled_segmentations == 0 or tok.model_type == "bpe",
         "tokenizer.sampled_segmentations needs tokenizer.model_type=bpe (BPE-dropout)"),
        (t.max_steps >= 0, "train.max_steps must be >= 0"),
        (t.batch_tokens >= 1, "train.batch_tokens must be >= 1"),
        (t.accum_steps >= 1, "train.accum_steps must be >= 1"),
        (t.lr >= 0.0, "train.lr must be >= 0"),
        (all(0.0 <= b < 1.0 for b in t.adam_betas), f"train.adam_betas must be in [0, 1), got {list(t.adam_betas)}"),
        (t.adam_eps >= 0.0, f"train.adam_eps must be >= 0, got {t.adam_eps}"),
        (t.warmup_steps >= 1, "train.warmup_steps must be >= 1"),
        (0.0 <= t.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)"),
        (t.log_every >= 1 and t.save_every >= 1, "train.log_every and train.save_every must be >= 1"),
        (t.valid_every >= 0 and t.keep_last >= 0 and t.patience >= 0 and t.keep_best >= 0,
         "train.valid_every, train.keep_last, train.keep_best and train.patience must be >= 0"),
        (not t.keep_best or (t.valid_every and t.valid_every % t.save_every == 0),
         f"train.keep_best needs train.valid_every to be a positive multiple of train.save_every "
         f"(got valid_every={t.valid_every}, save_every={t.save_every}): only saved steps can be kept"),
        (t.dist_timeout_minutes > 0, "train.dist_timeout_minutes must be > 0"),
        (t.valid_beam >= 1, "train.valid_beam must be >= 1"),
        (t.max_time_minutes >= 0, "train.max_time_minutes must be >= 0"),
        (t.init_vocab == "parent" or not t.init_optimizer,
         "train.init_optimizer=true needs train.init_vocab=parent (Adam's moments of the embeddings "
         "belong to the parent's vocabulary)"),
        (cfg.data.max_len >= 1 and cfg.data.max_len_ratio >= 1.0,
         "data.max_len must be >= 1 and data.max_len_ratio >= 1"),
        # a sentence of max_len tokens takes max_len + 1 positions with its EOS (or BOS)
        (cfg.data.max_len < m.max_positions,
         f"data.max_len ({cfg.data.max_len}) must be < model.max_positions ({m.max_positions}): "
         "a sentence takes one more position for its EOS/BOS"),
        (m.arch != "decoder_only" or tok.joint,
         "model.arch=decoder_only needs tokenizer.joint=true: source and target ids share one embedding"),
        # source + EOS and BOS + target, each at most max_len + 1 positions, in one sequence
        (m.arch != "decoder_only" or 2 * (cfg.data.max_len + 1) <= m.max_positions,
         f"model.arch=decoder_only reads source and target as one sequence: 2 * (data.max_len + 1) = "
         f"{2 * (cfg.data.max_len + 1)} must be <= model.max_positions ({m.max_positions})"),
    ]
    _raise_first(checks)
    validate_task(cfg)
    validate_decode(d)


TASK_ARCH = {"lm": "decoder_only", "mlm": "encoder_only"}  # the one model each monolingual task trains


def validate_task(cfg: Config) -> None:
    """The task's model, its data and its tokenizer fit together."""
    task, arch = cfg.task, cfg.model.arch
    if task == "translation":
        _raise_first([
            (cfg.tokenizer.text == "task", "tokenizer.text=pair is for task lm or mlm; task=translation "
             "always trains its tokenizer on both sides"),
            (arch != "encoder_only", "model.arch=encoder_only has no decoder to translate with: it needs "
             "task=mlm; choose model.arch encoder_decoder or decoder_only for task=translation"),
            (cfg.data.lang is None, "data.lang is the language of task lm or mlm; task=translation reads "
             "data.src_lang and data.tgt_lang"),
        ])
        return
    _raise_first([
        (arch == TASK_ARCH[task], f"task={task} needs model.arch={TASK_ARCH[task]}, got {arch}"),
        (bool(cfg.data.lang), f"task={task} needs data.lang: the language of its monolingual text"),
        (cfg.tokenizer.joint, f"task={task} needs tokenizer.joint=true: one side of its pairs is empty"),
        (cfg.tokenizer.text == "task" or cfg.data.lang in (cfg.data.src_lang, cfg.data.tgt_lang),
         f"tokenizer.text=pair trains on the parallel corpus of data.src_lang and data.tgt_lang "
         f"({cfg.data.src_lang}, {cfg.data.tgt_lang}), which must include data.lang ({cfg.data.lang})"),
    ])


def validate_decode(d: DecodeConfig) -> None:
    """Range checks of the decoding settings (also applied to command-line flags)."""
    _raise_first([
        (d.beam >= 1, f"beam size must be >= 1, got {d.beam}"),
        (1 <= d.nbest <= d.beam, f"nbest must be between 1 and the beam size ({d.beam}), got {d.nbest}"),
        (d.batch_tokens >= 1, f"decode batch_tokens must be >= 1, got {d.batch_tokens}"),
        (d.max_len_a >= 0 and d.max_len_b >= 0, "max_len_a and max_len_b must be >= 0"),
        (d.min_len >= 0 and d.no_repeat_ngram >= 0, "min_len and no_repeat_ngram must be >= 0"),
    ])


def _raise_first(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
