#!/usr/bin/env bash
# Prepare, train, average checkpoints and evaluate on test_2016_flickr; print one results row.
# Averaged: the step checkpoints of the train.keep_best best validations when the config keeps them,
# otherwise the newest AVERAGE_LAST (default 5).
# Usage: scripts/reproduce_multi30k.sh [CONFIG] [key=value ...]
# Data: DATA=DIR (default ../shared/data/multi30k when present, else the Hugging Face Hub).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/multi30k_en_de.yaml}
shift || true
NMT=${NMT:-.venv/bin/nmt}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-$( [ -d ../shared/data/multi30k ] && echo ../shared/data/multi30k || echo "")}
ARGS=("$@")
[ -n "$DATA" ] && ARGS=("data.dir=$DATA" "${ARGS[@]}")
read -r KEEP_BEST RUN_DIR < <("$PY" -c "import sys; from nmt.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:]); print(cfg.train.keep_best, cfg.run_dir)" "$CONFIG" "${ARGS[@]}")
if [ "$KEEP_BEST" -gt 0 ]; then AVERAGE=(--best "$KEEP_BEST"); else AVERAGE=(--last "${AVERAGE_LAST:-5}"); fi

start=$(date +%s)
"$NMT" prepare -c "$CONFIG" "${ARGS[@]}"
"$NMT" train -c "$CONFIG" "${ARGS[@]}"
"$NMT" average -o "$RUN_DIR/checkpoints/averaged.pt" "${AVERAGE[@]}" "$RUN_DIR"
"$NMT" evaluate -c "$CONFIG" "${ARGS[@]}" -m "$RUN_DIR/checkpoints/averaged.pt" --out "$RUN_DIR/test.hyp" \
  > "$RUN_DIR/test_scores.json"
end=$(date +%s)

"$PY" - "$RUN_DIR" "$CONFIG" "$((end - start))" "${ARGS[@]}" <<'PY'
import datetime, json, os, platform, sys
import torch
from nmt.config import load_config
from nmt.data.corpus import read_split
from nmt.evaluate import score
run_dir, config, seconds, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
cfg = load_config(config, overrides)
_, refs = read_split(cfg.data, "test")
hyps = open(f"{run_dir}/test.hyp", encoding="utf-8").read().splitlines()
cased = json.load(open(f"{run_dir}/test_scores.json"))
lower = score(hyps, refs, cfg.data.tgt_lang, lowercase=True)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
if torch.cuda.is_available():
    hardware = torch.cuda.get_device_name(0)
else:
    hardware = f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores"
direction = f"{cfg.data.src_lang}->{cfg.data.tgt_lang}"
row = {"config": config, "overrides": overrides, "direction": direction, "test": cfg.data.test,
       "bleu": round(cased["bleu"], 2), "bleu_lc": round(lower["bleu"], 2), "chrf": round(cased["chrf"], 2),
       "signature": cased["signature"]["bleu"], "wall_s": seconds, "hardware": hardware,
       "date": datetime.date.today().isoformat()}
print(json.dumps(row))
print(f"| {config} | {direction} | {cfg.data.test} | {row['bleu']} | {row['bleu_lc']} | {row['chrf']} | "
      f"{seconds / 60:.1f} min | {hardware} | {row['date']} |")
PY
