from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nmt.config import load_config
from nmt.data.prepare import prepare_data
from nmt.errors import NMTError
from nmt.mlm import evaluate_mlm, fill_mask
from nmt.model import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mlm_setup(tmp_path_factory, small_corpus):
    run = tmp_path_factory.mktemp("mlm")
    cfg = load_config(CONFIGS / "tiny.yaml", [f"run_dir={run}", f"data.dir={small_corpus}", "task=mlm",
                                              "model.arch=encoder_only", "data.lang=en"])
    data = prepare_data(cfg, log=lambda _m: None)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.tokenizer.src_vocab_size, data.tokenizer.tgt_vocab_size)
    return cfg, data, model


def test_the_tokenizer_of_task_mlm_has_mask_and_only_source_text(mlm_setup):
    _, data, _ = mlm_setup
    assert data.tokenizer.mask_id == 4
    assert data.valid.tgt.lengths().max() == 0 and data.valid.src.lengths().min() > 0


def test_validation_masks_the_same_way_every_time_and_leaves_the_training_rng_alone(mlm_setup):
    cfg, data, model = mlm_setup
    rng = torch.get_rng_state()
    first = evaluate_mlm(model, data, cfg, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)  # an exact resume does not depend on validations
    torch.rand(5)
    assert evaluate_mlm(model, data, cfg, torch.device("cpu")) == first
    assert set(first) == {"valid_loss", "valid_ppl", "valid_accuracy"} and 0 <= first["valid_accuracy"] <= 100
    assert model.training  # put back as it was


def test_fill_mask_gives_top_k_fillers_for_each_mask(mlm_setup):
    _, data, model = mlm_setup
    model.eval()
    try:
        fillers = fill_mask(model, data.tokenizer, "a man <mask> a ball in the <mask> .", 4)
        assert len(fillers) == 2 and all(len(f) == 4 for f in fillers)
        for row in fillers:
            probs = [p for _, p in row]
            assert probs == sorted(probs, reverse=True) and all(isinstance(w, str) and w for w, _ in row)
        with torch.no_grad():
            logits = model.head(model.encode(*_encoded(data.tokenizer, "a man <mask> a ball in the <mask> .")))
        assert fillers[0][0][1] == pytest.approx(float(logits[0, _mask_at(data.tokenizer)].softmax(-1).max()))
        with pytest.raises(NMTError, match="no <mask> in the text"):
            fill_mask(model, data.tokenizer, "a man holds a ball .", 4)
    finally:
        model.train()


def _encoded(tokenizer, text):
    from nmt.special import EOS_ID, PAD_ID

    src = torch.tensor([tokenizer.encode_src([text])[0] + [EOS_ID]])
    return src, src.eq(PAD_ID)


def _mask_at(tokenizer) -> int:
    return tokenizer.encode_src(["a man <mask> a ball in the <mask> ."])[0].index(tokenizer.mask_id)
