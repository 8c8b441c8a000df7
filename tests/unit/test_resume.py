from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.synthetic_corpus import write_corpus

from nmt.config import load_config
from nmt.data.prepare import prepare_data
from nmt.errors import NMTError
from nmt.evaluate import evaluate_model
from nmt.train import Trainer, train

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
quiet = lambda _msg: None  # noqa: E731


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


def _cfg(run_dir: Path, corpus: Path, *overrides: str):
    return load_config(CONFIGS / "tiny.yaml", [f"run_dir={run_dir}", f"data.dir={corpus}", "train.log_every=1",
                                               "train.valid_every=0", "data.max_valid_sentences=8", "train.threads=1",
                                               *overrides])


@pytest.fixture(scope="module")
def corpus_b(tmp_path_factory) -> Path:
    """Other synthetic sentences than small_corpus's (another seed): a different corpus of the same kind."""
    return write_corpus(tmp_path_factory.mktemp("corpus_b"), seed=1,
                        splits={"train": 600, "val": 40, "test_2016_flickr": 20})


@pytest.fixture(scope="module")
def parent(tmp_path_factory, small_corpus) -> Path:
    """A tiny model trained 12 steps on corpus A (small_corpus), validated at its end."""
    run = tmp_path_factory.mktemp("parent") / "run"
    train(_cfg(run, small_corpus, "train.max_steps=12"), log=quiet)
    return run


def _last_validation(run: Path) -> dict:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "valid_bleu" in r][-1]


def test_fine_tuning_keeps_the_parent_tokenizer_so_it_scores_as_the_parent_before_its_first_update(
        tmp_path, small_corpus, corpus_b, parent):
    last = parent / "checkpoints" / "last.pt"
    child = Trainer(_cfg(tmp_path / "child", corpus_b, f"train.init_from={last}", "train.max_steps=2"), log=quiet)
    parent_ckpt = torch.load(last, weights_only=True)
    assert child.data.tokenizer.to_state() == parent_ckpt["tokenizer"]
    # corpus A's validation split, encoded with the fine-tuning run's tokenizer, scored with its model
    cfg_a = _cfg(tmp_path / "eval_a", small_corpus)
    data_a = prepare_data(cfg_a, log=quiet, tokenizer=child.data.tokenizer)
    before = evaluate_model(child.model, data_a, cfg_a, child.device)
    expected = _last_validation(parent)
    assert before["valid_bleu"] == expected["valid_bleu"]
    # BLEU is still 0 after 12 steps of a tiny model: chrF and the loss are what tell vocabularies apart
    assert before["valid_chrf"] == expected["valid_chrf"] > 0
    assert before["valid_loss"] == pytest.approx(expected["valid_loss"], rel=1e-5)
    child.train()
    saved = torch.load(tmp_path / "child" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["tokenizer"] == parent_ckpt["tokenizer"]
    assert saved["config"]["tokenizer"] == parent_ckpt["config"]["tokenizer"]
    # resumed, the fine-tuning run goes on with the parent's tokenizer and its cached data
    messages = []
    train(_cfg(tmp_path / "child", corpus_b, f"train.init_from={last}", "train.max_steps=3"), log=messages.append)
    assert any(m.startswith("using cached data") for m in messages) and not any("trained" in m for m in messages)
    assert torch.load(tmp_path / "child" / "checkpoints" / "last.pt", weights_only=True)["tokenizer"] == \
        parent_ckpt["tokenizer"]


def test_fine_tuning_starts_fresh_by_default_and_keeps_what_the_switches_say(tmp_path, corpus_b, parent):
    last = parent / "checkpoints" / "last.pt"
    parent_ckpt = torch.load(last, weights_only=True)
    fresh = Trainer(_cfg(tmp_path / "fresh", corpus_b, f"train.init_from={last}"), log=quiet)
    assert fresh.state.step == 0 and fresh.scheduler.last_epoch == 0 and not fresh.optimizer.state
    kept = Trainer(_cfg(tmp_path / "kept", corpus_b, f"train.init_from={last}", "train.init_optimizer=true",
                        "train.init_schedule=true", "train.init_step=true"), log=quiet)
    assert kept.state.step == 12 and kept.scheduler.last_epoch == parent_ckpt["scheduler"]["last_epoch"] == 12
    assert kept.optimizer.param_groups[0]["lr"] == pytest.approx(parent_ckpt["scheduler"]["_last_lr"][0])
    exp_avg = [s["exp_avg"] for s in kept.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(exp_avg, parent_ckpt["optimizer"]["state"].values(),
                                                            strict=True))


def test_a_new_vocabulary_starts_the_embeddings_afresh_and_loads_the_rest(tmp_path, corpus_b, parent):
    last = parent / "checkpoints" / "last.pt"
    parent_model = torch.load(last, weights_only=True)["model"]
    # the same vocab_size: the shapes match, which used to load the parent's rows for other pieces
    child = Trainer(_cfg(tmp_path / "new", corpus_b, f"train.init_from={last}", "train.init_vocab=new"), log=quiet)
    assert child.data.tokenizer.src_vocab_size == 256
    vocab = {"encoder.embed.token.weight", "decoder.embed.token.weight", "output_proj.weight"}
    for name, tensor in child.model.state_dict().items():
        assert torch.equal(tensor, parent_model[name]) == (name not in vocab), name


def test_resume_refuses_changes_of_model_shape_tokenizer_and_data_before_writing(tmp_path, small_corpus, corpus_b):
    run = tmp_path / "r"
    train(_cfg(run, small_corpus, "train.max_steps=2"), log=quiet)
    config, tokenizer = (run / "config.yaml").read_text(), (run / "tokenizer" / "joint.model").read_bytes()
    with pytest.raises(NMTError) as e:
        Trainer(_cfg(run, corpus_b, "train.max_steps=4", "model.d_ff=96", "tokenizer.vocab_size=300"), log=quiet)
    message = str(e.value)
    assert "\n" not in message and "model.d_ff 128 -> 96" in message and "tokenizer.vocab_size 256 -> 300" in message
    assert "data.dir" in message and "train.max_steps" not in message
    assert (run / "config.yaml").read_text() == config
    assert (run / "tokenizer" / "joint.model").read_bytes() == tokenizer


def test_resume_with_other_changes_warns_and_keeps_the_config_history(tmp_path, small_corpus):
    run = tmp_path / "r"
    train(_cfg(run, small_corpus, "train.max_steps=2"), log=quiet)
    messages = []
    train(_cfg(run, small_corpus, "train.max_steps=3", "train.lr=1e-3", "model.dropout=0.2"), log=messages.append)
    warning = [m for m in messages if m.startswith("warning: resumed with changed settings")]
    assert len(warning) == 1 and "train.max_steps 2 -> 3" in warning[0] and "train.lr 0.003 -> 0.001" in warning[0]
    assert "model.dropout 0.1 -> 0.2" in warning[0] and "config.2.yaml" in warning[0]
    assert "lr: 0.003" in (run / "config.2.yaml").read_text()
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    assert "train.precision: set in the config" in (run / "config.yaml").read_text()


def test_auto_precision_is_logged_saved_resolved_and_kept_on_resume(tmp_path, small_corpus, monkeypatch):
    import nmt.precision as P

    amx = frozenset({"avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(P, "cpu_flags", lambda: amx)
    monkeypatch.setattr(P, "training_step_probe", lambda model, step: lambda: (0.2, 0.1))
    run = tmp_path / "r"
    messages = []
    train(_cfg(run, small_corpus, "train.max_steps=1", "train.precision=auto"), log=messages.append)
    reason = "auto: CPU has amx_bf16 and avx512_bf16 and a training step took 100 ms in bf16, 200 ms in fp32 (2.00x)"
    assert f"precision bf16: {reason}" in messages
    assert (run / "config.yaml").read_text().startswith(f"# train.precision: {reason}\n")
    assert "precision: bf16" in (run / "config.yaml").read_text()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]["train"]["precision"] == "bf16"
    # resumed where a probe would now say fp32: the run keeps its bf16, so nothing is listed as changed
    monkeypatch.setattr(P, "training_step_probe", lambda model, step: lambda: (0.1, 0.2))
    messages.clear()
    train(_cfg(run, small_corpus, "train.max_steps=2", "train.precision=auto"), log=messages.append)
    assert "precision bf16: auto: kept from the checkpoint being resumed" in messages
    assert not any("train.precision" in m for m in messages if m.startswith("warning"))
    # on a CPU without native bf16 the same resume trains in fp32, and says so
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2"}))
    messages.clear()
    train(_cfg(run, small_corpus, "train.max_steps=3", "train.precision=auto"), log=messages.append)
    assert any(m.startswith("precision fp32: auto: CPU without native bf16") for m in messages)
    assert any("train.precision bf16 -> fp32" in m for m in messages if m.startswith("warning"))


def _mlm_pair(**child_overrides):
    from nmt.config import ModelConfig
    from nmt.model import build_model

    base = dict(encoder_layers=2, decoder_layers=2, d_model=32, heads=4, d_ff=64, norm_first=True)
    torch.manual_seed(0)
    parent = build_model(ModelConfig(arch="encoder_only", **base), 40, 40)
    torch.manual_seed(1)
    child = build_model(ModelConfig(**{**base, **child_overrides}), 40, 40)
    return parent.state_dict(), child


def test_a_masked_lm_parent_loads_the_encoder_and_tied_embeddings_only():
    from nmt.checkpoint import load_model_weights
    from nmt.config import Config, ModelConfig
    from nmt.resume import loaded_and_fresh, pretrained_encoder

    parent, child = _mlm_pair()
    before = {k: v.clone() for k, v in child.state_dict().items()}
    weights, fresh = pretrained_encoder(parent, child, set())
    load_model_weights(child, weights, "p.pt")
    after = child.state_dict()
    for name, tensor in after.items():
        if name.startswith("encoder.") or name in ("decoder.embed.token.weight", "output_proj.weight"):
            assert torch.equal(tensor, parent[name.replace("decoder.", "encoder.").replace(
                "output_proj", "encoder.embed.token")]), name
            assert name not in fresh
        else:
            assert torch.equal(tensor, before[name]) and name in fresh, name
    line = loaded_and_fresh(Config(task="mlm", model=ModelConfig(arch="encoder_only")), child, fresh)
    assert line == (f"loaded {len(after) - len(fresh)} of {len(after)} tensors from a task=mlm "
                    "model.arch=encoder_only parent; starting afresh: decoder.layers.*, decoder.final_norm.weight, "
                    "decoder.final_norm.bias")
    _, untied = _mlm_pair(tie_embeddings=False)
    assert {"decoder.embed.token.weight", "output_proj.weight"} <= pretrained_encoder(parent, untied, set())[1]


def test_a_masked_lm_parent_of_another_shape_or_for_a_decoder_only_model_is_refused():
    from nmt.checkpoint import load_model_weights
    from nmt.config import Config, ModelConfig
    from nmt.resume import check_parent, pretrained_encoder

    parent, child = _mlm_pair(encoder_layers=3)
    with pytest.raises(NMTError, match=r"missing: encoder\.layers\.2\."):
        pretrained_encoder(parent, child, set())
    parent, child = _mlm_pair(encoder_layers=1)
    with pytest.raises(NMTError, match=r"unexpected: encoder\.layers\.1\."):
        load_model_weights(child, pretrained_encoder(parent, child, set())[0], "p.pt")
    parent, child = _mlm_pair(d_ff=32)
    with pytest.raises(NMTError, match=r"shape mismatch: encoder\.layers\.0\.ff\S* \(64, 32\) vs \(32, 32\)"):
        load_model_weights(child, pretrained_encoder(parent, child, set())[0], "p.pt")
    with pytest.raises(NMTError, match="masked LM .*not model.arch=decoder_only"):
        check_parent(Config(task="mlm"), Config(model=ModelConfig(arch="decoder_only")), "p.pt")


LM = ["task=lm", "model.arch=decoder_only", "data.lang=de", "train.best_metric=loss"]


@pytest.fixture(scope="module")
def lm_parent(tmp_path_factory, small_corpus) -> Path:
    """A tiny language model trained 4 steps on the German side of corpus A."""
    run = tmp_path_factory.mktemp("lm_parent") / "run"
    train(_cfg(run, small_corpus, "train.max_steps=4", *LM), log=quiet)
    return run


def test_a_language_model_starts_a_decoder_only_translator_with_all_its_weights(tmp_path, corpus_b, lm_parent):
    last = lm_parent / "checkpoints" / "last.pt"
    parent = torch.load(last, weights_only=True)
    messages = []
    child = Trainer(_cfg(tmp_path / "mt", corpus_b, f"train.init_from={last}", "model.arch=decoder_only",
                         "model.source_attention=bidirectional"), log=messages.append)
    assert child.cfg.task == "translation" and child.data.tokenizer.to_state() == parent["tokenizer"]
    assert child.data.train.src.lengths().min() > 0  # a parallel corpus now
    own = child.model.state_dict()
    assert own.keys() == parent["model"].keys() and all(torch.equal(own[k], parent["model"][k]) for k in own)
    line = next(m for m in messages if m.startswith("loaded "))
    assert line == f"loaded {len(own)} of {len(own)} tensors from a task=lm model.arch=decoder_only parent; " \
                   "starting afresh: none"
    fresh = Trainer(_cfg(tmp_path / "new", corpus_b, f"train.init_from={last}", "model.arch=decoder_only",
                         "train.init_vocab=new"), log=messages.append)
    assert messages[-1].endswith("starting afresh: decoder.embed.token.weight, output_proj.weight")
    assert fresh.state.step == 0


def test_a_language_model_refuses_to_start_an_encoder_decoder_and_names_mismatched_tensors(
        tmp_path, corpus_b, lm_parent):
    last = lm_parent / "checkpoints" / "last.pt"
    with pytest.raises(NMTError, match="task=lm.*starts a model.arch=decoder_only model.*not model.arch=encoder_decoder"):
        Trainer(_cfg(tmp_path / "ed", corpus_b, f"train.init_from={last}"), log=quiet)
    assert not (tmp_path / "ed").exists()  # refused before anything is written
    with pytest.raises(NMTError, match=r"does not fit this model \(shape mismatch: decoder.layers.0.ff.\w+.weight"):
        Trainer(_cfg(tmp_path / "wide", corpus_b, f"train.init_from={last}", "model.arch=decoder_only",
                     "model.d_ff=96"), log=quiet)


def test_an_lm_run_resumes_exactly(tmp_path, small_corpus):
    straight, split = tmp_path / "straight", tmp_path / "split"
    every = ["train.valid_every=3", "train.save_every=3", *LM]
    train(_cfg(straight, small_corpus, "train.max_steps=6", *every), log=quiet)
    train(_cfg(split, small_corpus, "train.max_steps=3", *every), log=quiet)
    train(_cfg(split, small_corpus, "train.max_steps=6", *every), log=quiet)
    runs = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (straight, split)]
    losses = [{r["step"]: r["loss"] for r in records if "loss" in r} for records in runs]
    assert sorted(losses[0]) == list(range(1, 7)) and losses[0] == pytest.approx(losses[1], abs=1e-6)
    valid = [{r["step"]: r["valid_ppl"] for r in records if "valid_ppl" in r} for records in runs]
    assert sorted(valid[0]) == [3, 6] and valid[0] == pytest.approx(valid[1], rel=1e-6)
    assert not any("valid_bleu" in r for r in runs[0])
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the task and the language are the training data: a resume cannot change them
    with pytest.raises(NMTError, match="cannot resume .* data.lang de -> en"):
        Trainer(_cfg(split, small_corpus, "train.max_steps=9", *every, "data.lang=en"), log=quiet)
    with pytest.raises(NMTError, match="cannot resume .* task lm -> translation, data.lang de -> None"):
        Trainer(_cfg(split, small_corpus, "train.max_steps=9", "model.arch=decoder_only"), log=quiet)


def test_a_masked_lm_parent_with_a_new_vocabulary_loads_the_encoder_without_its_embeddings():
    from nmt.resume import pretrained_encoder, vocabulary_tensors

    parent, child = _mlm_pair()
    vocab = vocabulary_tensors(child)
    weights, fresh = pretrained_encoder(parent, child, vocab)
    own = child.state_dict()
    assert vocab <= fresh and all(torch.equal(weights[k], own[k]) for k in vocab)
    layers = [k for k in own if k.startswith("encoder.layers.")]
    assert layers and all(torch.equal(weights[k], parent[k]) for k in layers) and not set(layers) & fresh


def test_a_translator_from_a_pair_tokenized_masked_lm_takes_its_tokenizer_but_stays_a_translation_run():
    from nmt.config import validate
    from nmt.resume import parent_tokenizer_config

    parent = load_config(None, ["task=mlm", "model.arch=encoder_only", "data.lang=en", "tokenizer.text=pair",
                                "tokenizer.vocab_size=300"])
    messages: list[str] = []
    child = parent_tokenizer_config(load_config(None, []), parent, messages.append)
    assert child.tokenizer.vocab_size == 300 and child.tokenizer.text == "task"
    validate(child)  # tokenizer.text=pair would be refused for a translation run
    assert len(messages) == 1 and "tokenizer.text" not in messages[0], messages
