#!/usr/bin/env bash
# Pretrain several tiny-sd variants side by side on one GPU, each scoring the 48-prompt set as it goes
# (pretrain-tiny --evals) and keeping its best pipeline; then pack each variant's best weights, eval
# log and recipe as $OUT/<name>.tar. This is how the shipped weights' last stage was chosen
# (docs/tiny-sd.md); every variant's exact command is in its recipe.json.
#
#   OUT=/tmp/out MINUTES=4.5 [ONLY='plain fast'] [DEVICE=cuda] bash loadtests/pretrain_sweep.sh
set -u
OUT=${OUT:?set OUT to a folder for the results}
MINUTES=${MINUTES:-4.5}
DEVICE=${DEVICE:-cuda}
EVALS=${EVALS:-12}
WORK=${WORK:-/tmp/sweep}
PY=${PY:-python3}
SHIPPED=basemodel/weights/tiny-sd
mkdir -p "$WORK" "$OUT"

common=(--device "$DEVICE" --minutes "$MINUTES" --evals "$EVALS" --noise-offset 0.1 --threads 3)
declare -A VARIANTS=(
  [resume]="--resume $SHIPPED --lr 3e-4 --batch 128 --edge-weight 8 --high-noise-weight 4"
  [scratch]="--vae-from $SHIPPED --lr 1e-3 --batch 256 --edge-weight 8 --high-noise-weight 4"
  [plain]="--vae-from $SHIPPED --lr 1e-3 --batch 256"
  [fast]="--vae-from $SHIPPED --lr 2e-3 --batch 256 --edge-weight 8 --high-noise-weight 4"
)
limit=${LIMIT:-$(awk -v m="$MINUTES" 'BEGIN { print int(m * 60 * 1.25 + 90) }')}
for name in "${!VARIANTS[@]}"; do
  [[ " ${ONLY:-${!VARIANTS[*]}} " == *" $name "* ]] || { unset "VARIANTS[$name]"; continue; }
  # shellcheck disable=SC2086
  timeout "$limit" "$PY" -m basemodel.pretrain --output "$WORK/$name" "${common[@]}" ${VARIANTS[$name]} \
    >"$WORK/$name.log" 2>&1 &
done
wait
for name in "${!VARIANTS[@]}"; do
  echo "== $name: $(grep -c '^eval' "$WORK/$name.log") evals; last lines:"
  grep -E '^eval|^pretrained|Error|error' "$WORK/$name.log" | tail -4
  files=("$name.log")
  for f in "$name.evals.jsonl" "$name.best" "$name/recipe.json"; do
    [ -e "$WORK/$f" ] && files+=("$f")
  done
  tar -cf "$OUT/$name.tar" -C "$WORK" "${files[@]}"
done
