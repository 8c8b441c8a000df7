from __future__ import annotations

import re
from pathlib import Path

import pytest

from nmt.config import (
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
    to_dict,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_base_model():
    cfg = Config()
    m = cfg.model
    assert (m.encoder_layers, m.decoder_layers, m.d_model, m.heads, m.d_ff) == (6, 6, 512, 8, 2048)
    assert cfg.train.label_smoothing == 0.1 and cfg.train.adam_betas == (0.9, 0.98)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_configs_folder_has_the_documented_files():
    names = {p.name for p in CONFIGS}
    assert {"transformer_base.yaml", "multi30k_en_de.yaml", "tiny.yaml", "wmt14_en_de.yaml"} <= names


@pytest.mark.parametrize("item, key, value", [
    ("train.lr=5e-4", "train.lr", 5e-4),
    ("model.tie_embeddings=false", "model.tie_embeddings", False),
    ("data.dir=null", "data.dir", None),
    ("run_dir=runs/x", "run_dir", "runs/x"),
    ("train.adam_betas=[0.9,0.99]", "train.adam_betas", [0.9, 0.99]),
])
def test_parse_override(item, key, value):
    k, v = parse_override(item)
    assert (k, v) == (key, value) or (k == key and float(v) == value)


def test_overrides_apply_on_top_of_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 128\n  heads: 4\ntrain:\n  lr: 0.1\n")
    cfg = load_config(path, ["train.lr=5e-4", "model.tie_embeddings=false", "data.dir=null",
                             "train.adam_betas=[0.9,0.99]"])
    assert cfg.model.d_model == 128 and cfg.train.lr == 5e-4
    assert cfg.model.tie_embeddings is False and cfg.data.dir is None
    assert cfg.train.adam_betas == (0.9, 0.99)
    assert isinstance(cfg.train.lr, float)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(CONFIGS[0], ["train.seed=7", "data.dir=/x"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, words", [
    ("model.nonexistent=1", ["model.nonexistent", "d_model"]),
    ("nosuchsection.x=1", ["nosuchsection", "valid keys of config", "train"]),
    ("train.lr=abc", ["train.lr", "float"]),
    ("train.max_steps=1.5", ["train.max_steps", "int"]),
    ("model.tie_embeddings=3", ["model.tie_embeddings", "bool"]),
    ("train.precision=fp8", ["train.precision", "fp32, bf16, fp16"]),
    ("model.heads=7", ["model.d_model", "divisible"]),
    ("model.dropout=-0.1", ["model.dropout"]),
    ("decode.beam=0", ["beam"]),
    ("train.adam_betas=0.9", ["train.adam_betas", "list of 2"]),
    ("model=3", ["model", "mapping"]),
    ("model.arch=gpt", ["model.arch", "encoder_decoder, decoder_only, encoder_only"]),
    ("task=mt", ["task", "translation, lm, mlm"]),
    ("model.source_attention=full", ["model.source_attention", "causal, bidirectional"]),
    ("noequals", ["key.sub=value"]),
    ("tokenizer.sampled_segmentations=-1", ["tokenizer.sampled_segmentations", ">= 0"]),
    ("tokenizer.sampling_alpha=0", ["tokenizer.sampling_alpha", "(0, 1)"]),
    ("tokenizer.sampling_alpha=1.0", ["tokenizer.sampling_alpha", "(0, 1)"]),
])
def test_bad_values_are_rejected_with_the_key_named(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_missing_file_and_yaml_syntax_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 128\n  heads: [4\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_config(bad)


def test_sampled_segmentations_need_a_bpe_model():
    with pytest.raises(ConfigError, match="sampled_segmentations needs tokenizer.model_type=bpe"):
        load_config(None, ["tokenizer.sampled_segmentations=2", "tokenizer.model_type=unigram"])
    assert load_config(None, ["tokenizer.sampled_segmentations=2"]).tokenizer.sampled_segmentations == 2


def test_tied_embeddings_need_a_joint_vocabulary():
    with pytest.raises(ConfigError, match="joint"):
        load_config(None, ["tokenizer.joint=false"])
    cfg = load_config(None, ["tokenizer.joint=false", "model.tie_embeddings=false"])
    assert cfg.tokenizer.joint is False


def test_decoder_only_needs_a_joint_vocabulary_and_room_for_source_and_target():
    with pytest.raises(ConfigError, match="decoder_only needs tokenizer.joint=true"):
        load_config(None, ["model.arch=decoder_only", "tokenizer.joint=false", "model.tie_embeddings=false"])
    # 2 * (256 + 1) = 514 positions: one fewer is refused, the default 1024 is enough
    with pytest.raises(ConfigError, match=r"2 \* \(data.max_len \+ 1\) = 514 must be <= model.max_positions \(513\)"):
        load_config(None, ["model.arch=decoder_only", "model.max_positions=513"])
    assert load_config(None, ["model.arch=decoder_only", "model.max_positions=514"]).model.arch == "decoder_only"
    assert load_config(None, ["model.max_positions=513"]).model.arch == "encoder_decoder"


def test_keep_best_needs_validations_on_saved_steps():
    with pytest.raises(ConfigError, match="train.keep_best needs train.valid_every to be a positive multiple"):
        load_config(None, ["train.keep_best=2", "train.valid_every=150", "train.save_every=100"])
    with pytest.raises(ConfigError, match="train.keep_best"):
        load_config(None, ["train.keep_best=2", "train.valid_every=0"])
    assert load_config(None, ["train.keep_best=2", "train.valid_every=400", "train.save_every=100"]).train.keep_best == 2


LM = ["task=lm", "model.arch=decoder_only", "data.lang=de"]


@pytest.mark.parametrize(("overrides", "words"), [
    (["task=lm", "data.lang=de"], "task=lm needs model.arch=decoder_only, got encoder_decoder"),
    (["task=lm", "data.lang=de", "model.arch=encoder_only"], "task=lm needs model.arch=decoder_only"),
    (["task=mlm", "data.lang=en", "model.arch=decoder_only"], "task=mlm needs model.arch=encoder_only"),
    (["task=lm", "model.arch=decoder_only"], "task=lm needs data.lang"),
    ([*LM, "tokenizer.joint=false", "model.tie_embeddings=false"], "needs tokenizer.joint=true"),
    (["data.lang=de"], "data.lang is the language of task lm or mlm"),
    (["model.arch=encoder_only"], "model.arch=encoder_only has no decoder"),
])
def test_task_rules_name_what_fits(overrides, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_task_defaults_to_translation_and_lm_mlm_load():
    cfg = load_config(None, [])
    assert cfg.task == "translation" and cfg.data.lang is None
    assert load_config(None, LM).task == "lm"
    assert load_config(None, ["task=mlm", "model.arch=encoder_only", "data.lang=en"]).model.arch == "encoder_only"


def test_a_pair_tokenizer_is_for_a_monolingual_task_on_a_pair_that_includes_its_language():
    mlm = ["task=mlm", "model.arch=encoder_only", "tokenizer.text=pair"]
    with pytest.raises(ConfigError, match="tokenizer.text=pair is for task lm or mlm"):
        load_config(None, ["tokenizer.text=pair"])
    with pytest.raises(ConfigError, match=r"must include data.lang \(fr\)"):
        load_config(None, [*mlm, "data.lang=fr"])
    with pytest.raises(ConfigError, match="invalid value for tokenizer.text"):
        load_config(None, [*mlm, "data.lang=en", "tokenizer.text=both"])
    assert load_config(None, [*mlm, "data.lang=en"]).tokenizer.text == "pair"
    assert load_config(None, ["task=lm", "model.arch=decoder_only", "data.lang=de", "tokenizer.text=pair"])
