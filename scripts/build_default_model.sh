#!/usr/bin/env bash
# Rebuild livevlm's shipped default model from scratch: synthetic-world data, frame features, four training
# stages, each from the last one's weights (recipes/default.yaml on 240 videos, default-stage2.yaml on 240
# new ones, default-stage3.yaml on 960 new ones, default-stage4.yaml on 80 new ones), a held-out
# evaluation, and the packaged copy under src/livevlm/assets/default_model.
# On 2 CPU cores: stage 1 about an hour (alone, it gives v0.2), stage 2 another (v0.3); stage 3 about
# three hours with its data, or minutes of training on a GPU (`livevlm train` uses one when it is there);
# stage 4 half an hour. Every step skips work already done, so rerunning continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
data=data
[ -f $data/world-train/annotations.jsonl ] || livevlm world generate $data/world-train --videos 240 --seed 0 --duration 30
[ -f $data/world-train2/annotations.jsonl ] || livevlm world generate $data/world-train2 --videos 240 --seed 3 --duration 30
[ -f $data/world-train3/annotations.jsonl ] || \
  livevlm world generate $data/world-train3 --videos 960 --seed 4 --duration 30 --workers "$(nproc)"
[ -f $data/world-train4/annotations.jsonl ] || \
  livevlm world generate $data/world-train4 --videos 80 --seed 5 --duration 30 --workers "$(nproc)"
[ -f $data/world-heldout/annotations.jsonl ] || livevlm world generate $data/world-heldout --videos 20 --seed 1 --duration 30
for split in train train2 train3 train4 heldout; do
  [ -f $data/world-$split/dialogue.jsonl ] || \
    livevlm data convert --from world $data/world-$split/annotations.jsonl $data/world-$split/dialogue.jsonl
  livevlm data encode $data/world-$split/dialogue.jsonl --out $data/world-$split/features
done
livevlm train recipes/default.yaml
livevlm train recipes/default-stage2.yaml
livevlm train recipes/default-stage3.yaml
livevlm train recipes/default-stage4.yaml
livevlm evaluate --model runs/default-stage4/model --data $data/world-heldout/dialogue.jsonl \
  --features $data/world-heldout/features | tee runs/default-stage4/heldout_metrics.json
python -m livevlm.default_model install runs/default-stage4/model
