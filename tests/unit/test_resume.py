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
    from nmt.resume import pretrained_encoder

    parent, child = _mlm_pair()
    before = {k: v.clone() for k, v in child.state_dict().items()}
    messages = []
    load_model_weights(child, pretrained_encoder(parent, child, set(), Path("p.pt"), messages.append), "p.pt")
    after = child.state_dict()
    for name, tensor in after.items():
        if name.startswith("encoder.") or name in ("decoder.embed.token.weight", "output_proj.weight"):
            assert torch.equal(tensor, parent[name.replace("decoder.", "encoder.").replace(
                "output_proj", "encoder.embed.token")]), name
        else:
            assert torch.equal(tensor, before[name]), name
    assert "decoder.layers.0.cross_attn" not in messages[0] and "starting fresh: decoder.final_norm" in messages[0]
    assert "loaded 27 encoder tensors and the embeddings tied to them" in messages[0]


def test_a_masked_lm_parent_of_another_shape_is_refused_naming_the_tensors():
    from nmt.errors import NMTError
    from nmt.resume import pretrained_encoder

    parent, child = _mlm_pair(encoder_layers=3)
    with pytest.raises(NMTError, match=r"missing: encoder\.layers\.2\."):
        pretrained_encoder(parent, child, set(), Path("p.pt"), quiet)
    from nmt.checkpoint import load_model_weights

    parent, child = _mlm_pair(encoder_layers=1)
    with pytest.raises(NMTError, match=r"unexpected: encoder\.layers\.1\."):
        load_model_weights(child, pretrained_encoder(parent, child, set(), Path("p.pt"), quiet), "p.pt")
    parent, child = _mlm_pair(d_ff=32)
    with pytest.raises(NMTError, match=r"shape mismatch: encoder\.layers\.0\.ff\S* \(64, 32\) vs \(32, 32\)"):
        load_model_weights(child, pretrained_encoder(parent, child, set(), Path("p.pt"), quiet), "p.pt")
