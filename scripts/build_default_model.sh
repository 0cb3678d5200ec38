#!/usr/bin/env bash
# Rebuild livevlm's shipped default model from scratch: synthetic-world data, frame features, training
# (recipes/default.yaml), a held-out evaluation, and the packaged copy under src/livevlm/assets/default_model.
# About an hour on 2 CPU cores. Every step skips work already done, so rerunning continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
data=data
[ -f $data/world-train/annotations.jsonl ] || livevlm world generate $data/world-train --videos 240 --seed 0 --duration 30
[ -f $data/world-heldout/annotations.jsonl ] || livevlm world generate $data/world-heldout --videos 20 --seed 1 --duration 30
for split in train heldout; do
  [ -f $data/world-$split/dialogue.jsonl ] || \
    livevlm data convert --from world $data/world-$split/annotations.jsonl $data/world-$split/dialogue.jsonl
  livevlm data encode $data/world-$split/dialogue.jsonl --out $data/world-$split/features
done
livevlm train recipes/default.yaml
livevlm evaluate --model runs/default/model --data $data/world-heldout/dialogue.jsonl \
  --features $data/world-heldout/features | tee runs/default/heldout_metrics.json
python -m livevlm.default_model install runs/default/model
