#!/usr/bin/env bash
# Rebuild livevlm's shipped default model from scratch: synthetic-world data, frame features, two training
# stages (recipes/default.yaml on 240 videos, then recipes/default-stage2.yaml on 240 new ones, from
# stage 1's weights), a held-out evaluation, and the packaged copy under src/livevlm/assets/default_model.
# About two hours on 2 CPU cores (stage 1 alone, about one, gives the previous default model, v0.2).
# Every step skips work already done, so rerunning continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
data=data
[ -f $data/world-train/annotations.jsonl ] || livevlm world generate $data/world-train --videos 240 --seed 0 --duration 30
[ -f $data/world-train2/annotations.jsonl ] || livevlm world generate $data/world-train2 --videos 240 --seed 3 --duration 30
[ -f $data/world-heldout/annotations.jsonl ] || livevlm world generate $data/world-heldout --videos 20 --seed 1 --duration 30
for split in train train2 heldout; do
  [ -f $data/world-$split/dialogue.jsonl ] || \
    livevlm data convert --from world $data/world-$split/annotations.jsonl $data/world-$split/dialogue.jsonl
  livevlm data encode $data/world-$split/dialogue.jsonl --out $data/world-$split/features
done
livevlm train recipes/default.yaml
livevlm train recipes/default-stage2.yaml
livevlm evaluate --model runs/default-stage2/model --data $data/world-heldout/dialogue.jsonl \
  --features $data/world-heldout/features | tee runs/default-stage2/heldout_metrics.json
python -m livevlm.default_model install runs/default-stage2/model
