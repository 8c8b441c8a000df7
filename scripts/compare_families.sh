#!/usr/bin/env bash
# Model families on Multi30k at one wall-clock budget and (about) one parameter count; prints a markdown table.
#   A  encoder-decoder, the config as is (random initialisation)
#   B  decoder-only, causal over the source;  C  decoder-only prefix LM (source_attention=bidirectional);
#      both with DECODER_ONLY_LAYERS layers (default 7: within 10% of A's parameters with the default config)
#   D  masked-LM pre-training of an encoder-only model (A's encoder) on the English side for MINUTES/3,
#      then translator A initialised from it (train.init_from, the parent's vocabulary) for 2*MINUTES/3
#   E  a German language model (decoder-only, DECODER_ONLY_LAYERS layers) for MINUTES: validation
#      perplexity on the German val text and 3 samples of nmt generate (seed 1)
# D's and E's tokenizers are trained on both languages (tokenizer.text=pair), as a translator's is.
# Each translator keeps the step checkpoints of its KEEP_BEST (default 5) best validations, is evaluated on
# the test split as their average; sentences/s is the test set over the wall time of that nmt evaluate.
# Usage: scripts/compare_families.sh [MINUTES] [key=value ...]  (the overrides go to every run, last)
# Env: CONFIG (default configs/multi30k_en_de.yaml), OUT (default runs/families), DATA (as in
# scripts/reproduce_multi30k.sh), NMT, PY, DECODER_ONLY_LAYERS, KEEP_BEST.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-15}
shift || true
CONFIG=${CONFIG:-configs/multi30k_en_de.yaml}
OUT=${OUT:-runs/families}
NMT=${NMT:-.venv/bin/nmt}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-$( [ -d ../shared/data/multi30k ] && echo ../shared/data/multi30k || echo "")}
LAYERS=${DECODER_ONLY_LAYERS:-7}
KEEP_BEST=${KEEP_BEST:-5}
EXTRA=("$@")
COMMON=("train.max_steps=1000000")
[ -n "$DATA" ] && COMMON+=("data.dir=$DATA")
PRE_MINUTES=$("$PY" -c "import sys; print(float(sys.argv[1]) / 3)" "$MINUTES")
POST_MINUTES=$("$PY" -c "import sys; print(float(sys.argv[1]) * 2 / 3)" "$MINUTES")
DECODER_ONLY=("model.arch=decoder_only" "model.decoder_layers=$LAYERS")
PAIR=("tokenizer.text=pair")
mkdir -p "$OUT"

train() {  # ARM MINUTES key=value...: train into $OUT/ARM, the log in $OUT/ARM.log
  local arm=$1 minutes=$2
  shift 2
  "$NMT" train -c "$CONFIG" "${COMMON[@]}" "run_dir=$OUT/$arm" "train.max_time_minutes=$minutes" "$@" "${EXTRA[@]}" \
    | tee "$OUT/$arm.log"
}

translator() {  # ARM MINUTES key=value...: train, average the best validations, evaluate on test (timed)
  local arm=$1 minutes=$2
  shift 2
  local args=("${COMMON[@]}" "run_dir=$OUT/$arm" "train.keep_best=$KEEP_BEST" "$@")
  train "$arm" "$minutes" "train.keep_best=$KEEP_BEST" "$@"
  "$NMT" average -o "$OUT/$arm/checkpoints/averaged.pt" --best "$KEEP_BEST" "$OUT/$arm"
  local start end
  start=$("$PY" -c "import time; print(time.time())")
  "$NMT" evaluate -c "$CONFIG" "${args[@]}" "${EXTRA[@]}" -m "$OUT/$arm/checkpoints/averaged.pt" \
    --out "$OUT/$arm/test.hyp" > "$OUT/$arm/test_scores.json"
  end=$("$PY" -c "import time; print(time.time())")
  echo "$start $end" > "$OUT/$arm/evaluate_seconds"
}

"$NMT" prepare -c "$CONFIG" "${COMMON[@]}" "run_dir=$OUT/A" "${EXTRA[@]}"
translator A "$MINUTES"
translator B "$MINUTES" "${DECODER_ONLY[@]}" "model.source_attention=causal"
translator C "$MINUTES" "${DECODER_ONLY[@]}" "model.source_attention=bidirectional"
train D_mlm "$PRE_MINUTES" task=mlm model.arch=encoder_only data.lang=en "${PAIR[@]}"
PARENT=$OUT/D_mlm/checkpoints/best.pt
[ -f "$PARENT" ] || PARENT=$OUT/D_mlm/checkpoints/last.pt
translator D "$POST_MINUTES" "train.init_from=$PARENT" train.init_vocab=parent
train E "$MINUTES" task=lm data.lang=de "${DECODER_ONLY[@]}" "${PAIR[@]}"
E_CKPT=$OUT/E/checkpoints/best.pt
[ -f "$E_CKPT" ] || E_CKPT=$OUT/E/checkpoints/last.pt
"$NMT" generate -m "$E_CKPT" --num 3 --seed 1 > "$OUT/E/samples.txt"

"$PY" - "$OUT" "$MINUTES" <<'PY'
import json, re, sys
from pathlib import Path
out, minutes = Path(sys.argv[1]), sys.argv[2]
NAMES = {"A": "encoder-decoder", "B": "decoder-only, causal", "C": "decoder-only, prefix LM",
         "D": "encoder-decoder from masked LM", "E": "German LM (decoder-only)"}

def parameters(arm: str) -> int:
    found = re.search(r"model: ([\d,]+) parameters", (out / f"{arm}.log").read_text())
    return int(found.group(1).replace(",", ""))

def records(arm: str) -> list[dict]:
    return [json.loads(x) for x in (out / arm / "metrics.jsonl").read_text().splitlines()]

def updates(arm: str) -> int:
    return max((r["step"] for r in records(arm)), default=0)  # the last validation's step is the last update

def best(arm: str, key: str, low: bool) -> float:
    values = [r[key] for r in records(arm) if key in r]
    return min(values) if low else max(values)

print(f"\n## Model families: {minutes} minutes per arm\n")
print("| arm | model | parameters | updates | val BLEU / ppl | test BLEU | test chrF | sentences/s |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
reference = parameters("A")
for arm in "ABCD":
    scores = json.loads((out / arm / "test_scores.json").read_text().splitlines()[0])
    start, end = map(float, (out / arm / "evaluate_seconds").read_text().split())
    sentences = len((out / arm / "test.hyp").read_text(encoding="utf-8").splitlines())
    n = parameters(arm)
    note = "" if abs(n - reference) <= 0.1 * reference else " (not within 10% of A)"
    steps = f"{updates('D_mlm')} + {updates(arm)}" if arm == "D" else str(updates(arm))
    print(f"| {arm} | {NAMES[arm]} | {n:,}{note} | {steps} | {best(arm, 'valid_bleu', low=False):.2f} | "
          f"{scores['bleu']:.2f} | {scores['chrf']:.2f} | {sentences / (end - start):.1f} |")
print(f"| E | {NAMES['E']} | {parameters('E'):,} | {updates('E')} | ppl {best('E', 'valid_ppl', low=True):.2f} "
      "| – | – | – |")
print("\nval BLEU: the best validation during training; D's updates: masked-LM + translation.")
print("\nSamples of E (nmt generate --num 3 --seed 1):\n")
for line in (out / "E" / "samples.txt").read_text(encoding="utf-8").splitlines():
    print(f"- {line}")
PY
