#!/usr/bin/env bash
# Rebuild livevlm's shipped default model (v0.10) from scratch: synthetic-world videos, frame features with
# their mean colours and hue histograms (and, for the later stages, the hues of the pixels that changed),
# four stages of training — single frames read in reading order (recipes/default-align.yaml), pairs of
# frames saying what just changed (recipes/default-changes.yaml, from stage 1 widened for the changed hues),
# the streams with some of those pairs mixed in (recipes/default.yaml, from stage 1b), then reminders decided
# after the model's own note of each event (recipes/default-notes.yaml, from stage 2) — θ chosen free-running
# on the validation split, the held-out targets, and the packaged copy under src/livevlm/assets/default_model.
# About 4.3 hours on 2 CPU cores (about 210 minutes of them training; the sum of the steps as measured, stages
# 1 to 2 on an earlier machine, stage 3 on a slower one; not rerun end to end; `livevlm train` uses a GPU when
# there is one). Every step skips work already done, so rerunning continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
data=data
[ -f $data/world-train5/annotations.jsonl ] || \
  livevlm world generate $data/world-train5 --videos 120 --seed 6 --duration 30 --workers "$(nproc)"
[ -f $data/world-val/annotations.jsonl ] || livevlm world generate $data/world-val --videos 20 --seed 2 --duration 30
[ -f $data/world-heldout/annotations.jsonl ] || livevlm world generate $data/world-heldout --videos 20 --seed 1 --duration 30
for split in train5 val heldout; do
  [ -f $data/world-$split/dialogue.jsonl ] || \
    livevlm data convert --from world $data/world-$split/annotations.jsonl $data/world-$split/dialogue.jsonl
  livevlm data encode $data/world-$split/dialogue.jsonl --out $data/world-$split/features-chg12 --mean-rgb \
    --hue-bins 12 --change-hues
done
# Stage 1 reads single frames (20 of each video's 60) without the changed hues (they start as a copy of its hue
# columns after it); only those frames are encoded.
[ -f $data/world-train5/scene.jsonl ] || \
  livevlm data convert --from world-scene $data/world-train5/annotations.jsonl $data/world-train5/scene.jsonl
livevlm data encode $data/world-train5/scene.jsonl --out $data/world-train5/features-hue12 --mean-rgb --hue-bins 12 \
  --used-frames-only
# Stage 1b's two-frame clips come from videos of their own (the streams' 120 give too few); only the clips'
# frames are encoded.
[ -f $data/world-changes7/annotations.jsonl ] || \
  livevlm world generate $data/world-changes7 --videos 480 --seed 7 --duration 30 --workers "$(nproc)"
[ -f $data/world-changes7/changes.jsonl ] || \
  livevlm data convert --from world-changes $data/world-changes7/annotations.jsonl $data/world-changes7/changes.jsonl
livevlm data encode $data/world-changes7/changes.jsonl --out $data/world-changes7/features-chg12 --mean-rgb \
  --hue-bins 12 --change-hues --used-frames-only
livevlm train recipes/default-align.yaml  # stage 1: single frames
[ -f runs/default-align-chg/livevlm.yaml ] || \
  python scripts/init_change_hues.py runs/default-align/model runs/default-align-chg
livevlm train recipes/default-changes.yaml  # stage 1b: what just changed, from stage 1
livevlm train recipes/default.yaml          # stage 2: the streams (+ 800 of stage 1b's clips), from stage 1b
# Stage 3, reminders decided after the model's own note (recipes/default-notes.yaml, from stage 2): reminder
# clips and their unanswered twins with notes, narration clips under each narration prompt, the streams with
# notes in their reminders, and "what just changed" clips of the streams' own videos.
[ -f $data/world-train5/reminder-notes.jsonl ] || livevlm data convert --from world-reminders --reminders 12 \
  --reminder-pairs --reminder-notes $data/world-train5/annotations.jsonl $data/world-train5/reminder-notes.jsonl
[ -f $data/world-train5/dialogue-notes.jsonl ] || livevlm data convert --from world --reminder-notes \
  $data/world-train5/annotations.jsonl $data/world-train5/dialogue-notes.jsonl
[ -f $data/world-train5/narration-clips.jsonl ] || livevlm data convert --from world-narration --narration-clips 4 \
  $data/world-train5/annotations.jsonl $data/world-train5/narration-clips.jsonl
[ -f $data/world-train5/changes.jsonl ] || \
  livevlm data convert --from world-changes $data/world-train5/annotations.jsonl $data/world-train5/changes.jsonl
livevlm train recipes/default-notes.yaml    # stage 3: notes, from stage 2
# The recommended θ: the one whose own responses, free-running, match the validation turns best (of the θs
# within one turn of the best F1, the fewest duplicates); stored in the model's livevlm.yaml.
livevlm evaluate --model runs/default-notes/model --data $data/world-val/dialogue.jsonl --features $data/world-val/features-chg12 \
  --free-running --choose-threshold --threshold 0.7 --threshold 0.725 --threshold 0.8 \
  --results runs/default-notes/val_free_running.jsonl
python benchmarks/default_model_targets.py --model runs/default-notes/model --data $data/world-heldout/dialogue.jsonl \
  --features $data/world-heldout/features-chg12 --results runs/default-notes/heldout_free_running.jsonl \
  | tee runs/default-notes/targets.md
livevlm assets package-default runs/default-notes/model
