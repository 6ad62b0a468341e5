#!/usr/bin/env bash
# End-to-end demo on a rendered caption set: `make demo` runs `bash scripts/demo.sh .venv/bin/python demo`.
#   1. cli demo-data: 1,200 scenes of coloured shapes with five true captions each (1000/100/100 split)
#   2. cli extract:   EfficientNet-Lite0 patch tokens + MiniLM token states for every split (CPU, offline)
#   3. cli train-head + cli eval: a VSE∞ head on those caches, selected on dev, scored on test
# A rerun keeps the complete caches written with the same settings and retrains the head.
set -euo pipefail

PY=${1:?usage: bash scripts/demo.sh PYTHON DIR}
DIR=${2:?usage: bash scripts/demo.sh PYTHON DIR}
cd "$(dirname "$0")/.."

DATASET=f30k                   # the demo set uses the Flickr30K layout
FEATURES="$DIR/features"       # caches: $FEATURES/$DATASET/<split>/{image,text}-<tag>.h5
IMAGE_TAG=efficientnet_lite0
TEXT_TAG=minilm

echo "== 1/3 rendering the demo caption set into $DIR"
"$PY" cli.py demo-data "$DIR"

echo "== 2/3 extracting $IMAGE_TAG + $TEXT_TAG features into $FEATURES"
"$PY" cli.py extract --backbone efficientnet_lite0 --text-encoder minilm \
    --dataset "$DATASET" --data-path "$DIR" --images "$DIR/images" \
    --split train,dev,test --out "$FEATURES"

echo "== 3/3 training a head on $FEATURES/$DATASET/{train,dev}, evaluating it on test"
RUN="$DIR/runs/vse"
rm -rf "$RUN"                  # a rerun trains afresh (train-head refuses to overwrite a run)
"$PY" cli.py train-head --config configs/demo_vse.yaml --out "$RUN" \
    --set data.features="$FEATURES" --set data.dataset="$DATASET" \
    --set data.image="$IMAGE_TAG" --set data.text="$TEXT_TAG"
echo "== evaluating the best dev checkpoint on the test split"
"$PY" cli.py eval --checkpoint "$RUN/best.pt" --split test
