#!/usr/bin/env bash
# Regenerates every shipped entry, its signed verification, the tables and the site from real
# runs, with the commands a submitter and the board's maintainers use. Verification signs with
# the board's private key: $LEAKBENCH_BOARD_KEY_FILE must name it (it lives outside the
# repository), and the attack sandbox must be available.
#   LEAKBENCH_BOARD_KEY_FILE=/path/board.pem leaderboards/regenerate.sh [GROUP...]
# GROUP: original (the seed papers' tracks), new-attacks (Robbing the Fed, the cocktail party,
# GradInversion) or one track of the new attacks; none: both groups. Runs go to
# runs/leaderboard/; the tables and the site are re-rendered.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LEAKBENCH_BOARD_KEY_FILE:?set it to the file of the board private key}"
LEAKBENCH=${LEAKBENCH:-.venv/bin/leakbench}
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/leaderboard}
TRACKS=leaderboards/tracks

# run TRACK NAME [OVERRIDES-AS-YAML]: the track file, plus free keys (attack_options) and
# bookkeeping keys (where to write, covariates), run and submitted as one entry per cell.
run_track() {
  local track=$1 name=$2 overrides=${3:-"{}"}
  mkdir -p "$RUNS"
  rm -rf "${RUNS:?}/$name"  # a fresh run, never the resumption of an older one
  "$PYTHON" - "$TRACKS/$track.yaml" "$overrides" "$RUNS/$name.yaml" <<'PY'
import sys
import yaml
config = yaml.safe_load(open(sys.argv[1]))
config.update(yaml.safe_load(sys.argv[2]))
yaml.safe_dump(config, open(sys.argv[3], "w"), sort_keys=False)
PY
  "$LEAKBENCH" run --config "$RUNS/$name.yaml" --output-dir "$RUNS" --run-name "$name" \
    --logger none --threads 1 --no-progress
  "$LEAKBENCH" submit "$RUNS/$name" --submitter "leakbench maintainers" --replace
}

# verify_tracks TRACK...: every entry of the tracks re-measured on unseen trials and signed.
verify_tracks() {
  for track in "$@"; do
    "$LEAKBENCH" leaderboard verify leaderboards/entries/"$track"/*.json --threads 1 \
      --runs-dir "$RUNS/verify" || true
  done
}

# Only these tracks' entries are regenerated; other tracks' entries are left as they are.
MINE=(lfw-subset-lenet-zhu-b1 lfw-subset-cnn6-b1 lfw-subset-fcn-exan-b4 lfw-subset-resnet18-b1
  lfw-subset-fcn-analytic lfw-subset-fcn-exan-fishing)
original() {
  for track in "${MINE[@]}"; do rm -rf "leaderboards/entries/$track"; done
  run_track lfw-subset-lenet-zhu-b1 lenet-zhu-b1
  run_track lfw-subset-cnn6-b1 cnn6-b1 \
    "{attack_options: {dlg: {iterations: 100}, improved-rgap: {dlg_iterations: 100}}}"
  run_track lfw-subset-fcn-exan-b4 fcn-exan-b4
  run_track lfw-subset-resnet18-b1 resnet18-b1 \
    "{attack_options: {inverting-gradients: {iterations: 100}}, covariates: []}"
  run_track lfw-subset-fcn-analytic fcn-analytic
  # B = 256 is left out of the shipped board: with the L2 objective its perturbation takes
  # 13.5 CPU-s a trial (LP wall 53 s at load 4-7), 20 trials with verification;
  # `leakbench fishing-study --batch-sizes [64,128,256]` measures it instead.
  run_track lfw-subset-fcn-exan-fishing fcn-exan-fishing \
    "{attack_options: {fishing: {solver: highs}}, batch_sizes: [8, 16, 32, 64, 128]}"
  verify_tracks "${MINE[@]}"
}

# The new attacks' tracks (issue 19). Besides each track's own attacks, the FC tracks run the
# baselines their SoK letter admits that attack any batch size: the bias attack (A). (The
# cocktail party cannot run on the digits tracks: it needs more pixels than the batch has
# samples, and 8x8 digits have 64.) One gradient evaluation of GradInversion on ResNet-18 costs
# 2.0, 3.9, 7.5 and 11.7 CPU-seconds at B = 8, 16, 32, 48 (`leakbench timing attacks --attacks
# [gradinversion]`, one thread), Inverting Gradients' about as much: the shipped entries are
# B = 8 and 16 at 4 steps of a group of 2 (GradInversion) and 8 iterations (Inverting Gradients),
# the same 8 gradient evaluations each, 13 trials per entry with verification (B = 32 would add
# about 30 CPU-minutes, B = 48 about 45); rerun with the track's budget and every batch size on
# GPUs.
NEW_ATTACKS=(digits-fcn-imprint digits-fcn-imprint-fedavg lfw-subset-fcn-cocktail-b64
  lfw-subset-resnet18-gradinversion)
# new_attack_track TRACK: one of them, its entries made and verified afresh.
new_attack_track() {
  local track=$1 fc_baselines="attacks: [robbing-the-fed, exan, bias]"
  rm -rf "leaderboards/entries/$track"
  case $track in
    digits-fcn-imprint) run_track "$track" imprint "{$fc_baselines}" ;;
    digits-fcn-imprint-fedavg) run_track "$track" imprint-fedavg "{$fc_baselines}" ;;
    lfw-subset-fcn-cocktail-b64)
      run_track "$track" cocktail-b64 "{attacks: [cocktail-party, exan, bias]}" ;;
    lfw-subset-resnet18-gradinversion)
      run_track "$track" resnet18-gradinversion "{batch_sizes: [8, 16], attack_options:
        {gradinversion: {iterations: 4, group: 2, group_every: 1},
        inverting-gradients: {iterations: 8}}}" ;;
  esac
  verify_tracks "$track"
}

# Arguments: groups (original, new-attacks) or single tracks of the new attacks; none: both groups.
GROUPS_TO_RUN=(${*:-original new-attacks})
for group in "${GROUPS_TO_RUN[@]}"; do
  case " original new-attacks ${NEW_ATTACKS[*]} " in
    *" $group "*) ;;
    *) echo "regenerate.sh: unknown group '$group'; expected original, new-attacks or one of" \
      "${NEW_ATTACKS[*]}" >&2; exit 2 ;;
  esac
done
for group in "${GROUPS_TO_RUN[@]}"; do
  case $group in
    original) original ;;
    new-attacks) for track in "${NEW_ATTACKS[@]}"; do new_attack_track "$track"; done ;;
    *) new_attack_track "$group" ;;
  esac
done
rm -rf leaderboards/tables
"$LEAKBENCH" leaderboard render
"$LEAKBENCH" leaderboard build
