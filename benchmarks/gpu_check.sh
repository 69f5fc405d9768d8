#!/usr/bin/env bash
# The GPU path, proven on a GPU (issue 14): fine-tune the project's classifier under KERAS_BACKEND=jax
# on the lent GPU machine (PyTorch, JAX and ONNX Runtime there; no TensorFlow, no package registry,
# at most 64 MiB carried), report images/s, GPU utilisation and val-accuracy parity with the CPU run.
#
#   benchmarks/gpu_check.sh --prepare      # here: data subset + wheels + weights + CPU reference into
#                                          #   benchmarks/work/gpu_carry (one folder to carry, < 60 MiB)
#   benchmarks/gpu_check.sh                # there: run(command="bash benchmarks/gpu_check.sh",
#                                          #   carry=["benchmarks/work/gpu_carry"], timeout_s=480)
#   benchmarks/gpu_check.sh --dry-run      # here, in the tests: the same driver on CPU under JAX with
#                                          #   TensorFlow made unimportable, on a tiny generated subset
#
# Carried wheels (installed with --no-index into a venv that sees the machine's own jax/torch):
#   keras==3.15.1 and its small deps (namex, optree, h5py, absl-py, rich, markdown-it-py, mdurl, pygments),
#   pydantic + pydantic-core + annotated-types + typing-inspection (components.core.config), PyYAML, Pillow.
#   Binary wheels are fetched for CPython 3.11 and 3.12 (manylinux x86_64; keras 3.15 needs Python
#   >= 3.11; GPU_CHECK_PYTHONS="3.11 3.12 3.13" adds one, ~15 MB more): the GPU machine's Python is
#   not known in advance. Carry: ~37 MB of wheels + ~6 MB subset + 2 MB weights. Not carried: albumentations (+ opencv, ~50 MB): the driver
#   augments with numpy flips, so the check measures the model/training path, not the policy.
#   Not carried: TensorFlow (cannot go there), mlflow/dvc/prefect (the driver does not track).
#
# The driver builds the model with components.modeling.backbones (build_classifier, unfreeze_top), trains the
# head with the backbone frozen, then fine-tunes as finetune does (top layers unfrozen, BatchNorm in
# inference mode, Adam with finetune's warm-up + cosine schedule, label smoothing), with mixed
# precision on a GPU. Images come through components.ingestion.images.decode_rgb into a keras.utils.PyDataset.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="${GPU_CARRY:-$REPO/benchmarks/work/gpu_carry}"
OUT_DIR="${OUT:-$REPO/benchmarks/work/gpu_out}"
PY="${PYTHON:-python3}"
[ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$REPO/.venv/bin/python"
MODE=gpu
IMAGE_SIZE=224 ALPHA=0.5 HEAD_EPOCHS=2 FT_EPOCHS=4 BATCH=32 CLASSES=5 TRAIN_PER_CLASS=48 VAL_PER_CLASS=16
PARITY_TOLERANCE=0.05  # |val accuracy GPU - CPU|: 4 of 80 val images (different backends draw different inits)
FETCH_WHEELS=1
SOURCE="${TP_SHARED_DIR:-$REPO/../shared}/datasets/flower_photos"

while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry ;;
    --no-wheels) FETCH_WHEELS=0 ;;
    --out) OUT_DIR="$2"; shift ;;
    --carry) CARRY="$2"; shift ;;
    --source) SOURCE="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT_DIR"

# --- the driver: backend-agnostic Keras 3 (no tf.*) ---------------------------------------------
driver() {  # driver <data root> <out json> <weights> [reference json]
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$@" \
    "$IMAGE_SIZE" "$ALPHA" "$HEAD_EPOCHS" "$FT_EPOCHS" "$BATCH" "$PARITY_TOLERANCE" <<'PY'
import importlib.abc, json, math, os, sys, time
from pathlib import Path

data_root, out_json, weights, reference = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
size, alpha, head_epochs, ft_epochs, batch = int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])
parity_tolerance = float(sys.argv[10])

if os.environ.get("GPU_CHECK_BLOCK_TF") == "1":
    class NoTensorFlow(importlib.abc.MetaPathFinder):  # as on the GPU machine: no TensorFlow at all
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tf_keras"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: the GPU worker has no TensorFlow)")
            return None
    sys.meta_path.insert(0, NoTensorFlow())

import numpy as np
import keras
from components.modeling.backbones import build_classifier, get_spec, unfreeze_top
from components.core.stage_config import FinetuneConfig, TrainHeadConfig
from components.core.config import ModelConfig
from components.ingestion.images import ImageLimits, decode_rgb
from components.modeling.distribution import announce, replica_plan

backend = keras.config.backend()
if backend == "jax":
    import jax
    devices = [f"{d.platform}:{getattr(d, 'device_kind', '')}" for d in jax.devices()]
    on_gpu = jax.default_backend() == "gpu"
else:
    devices, on_gpu = [backend], False
keras.utils.set_random_seed(0)
if on_gpu:
    keras.mixed_precision.set_global_policy("mixed_float16")  # as runtime.configure_tensorflow does on GPUs
# As finetune does: data parallel over every GPU the machine has (BATCH is the global batch).
plan = replica_plan(os.environ.get("GPU_CHECK_DATA_PARALLEL", "auto"))
announce(plan, "gpu_check")
batch = plan.global_batch(batch, "BATCH")

limits = ImageLimits(max_bytes=20 << 20, max_pixels=50_000_000, formats=("JPEG", "PNG"))
classes = sorted(d.name for d in (data_root / "train").iterdir() if d.is_dir())

def load(split):
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((data_root / split / name).iterdir()):
            xs.append(decode_rgb(f, size, limits))
            ys.append(label)
    return np.stack(xs), np.asarray(ys)

t0 = time.perf_counter()
train_x, train_y = load("train")
val_x, val_y = load("val")
decode_seconds = time.perf_counter() - t0

class Batches(keras.utils.PyDataset):
    """Shuffled float32 batches with random horizontal flips (numpy), one-hot labels."""
    def __init__(self, x, y, augment, seed=0):
        super().__init__()
        self.x, self.y, self.augment = x, np.eye(len(classes), dtype="float32")[y], augment
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x)) if augment else np.arange(len(x))
    def __len__(self):
        return math.ceil(len(self.x) / batch)
    def __getitem__(self, i):
        idx = self.order[i * batch:(i + 1) * batch]
        if self.augment and len(idx) % plan.replicas:  # JAX splits a batch only evenly: top up from the start
            idx = np.concatenate([idx, np.resize(self.order, plan.replicas - len(idx) % plan.replicas)])
        xb = self.x[idx].astype("float32")
        if self.augment:
            flip = self.rng.random(len(idx)) < 0.5
            xb[flip] = xb[flip, :, ::-1]
        return xb, self.y[idx]
    def on_epoch_end(self):
        if self.augment:
            self.order = self.rng.permutation(len(self.x))

class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__(); self.seconds = []
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)

def schedule(config, steps_per_epoch):
    try:  # finetune's own schedule when its imports (mlflow, ...) are there; the same formula otherwise
        from components.modeling.optimization import lr_schedule
        return lr_schedule(config, steps_per_epoch), "components.modeling.optimization.lr_schedule"
    except ImportError:
        warmup = min(config.warmup_epochs, max(config.epochs - 1, 0)) * steps_per_epoch
        decay = max(1, config.epochs * steps_per_epoch - warmup)
        if warmup == 0:
            return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=decay), "copy"
        return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=decay, warmup_target=config.learning_rate,
                                                      warmup_steps=warmup), "copy"

head_cfg = TrainHeadConfig(label_smoothing=0.0)
train_ds, val_ds = Batches(train_x, train_y, augment=True), Batches(val_x, val_y, augment=False)
validation_data, validation = plan.validation_callbacks(val_ds)  # JAX: val scored outside the distribution
with plan.scope():  # built, compiled and trained on every replica
    model, base = build_classifier(ModelConfig(backbone="mobilenet_v2", alpha=alpha, image_size=size,
                                               weights=weights), len(classes), head_cfg)
    model.compile(optimizer=keras.optimizers.Adam(head_cfg.learning_rate),
                  loss=keras.losses.CategoricalCrossentropy(),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    head_timer = EpochTimer()
    model.fit(train_ds, validation_data=validation_data, epochs=head_epochs, callbacks=[*validation, head_timer],
              verbose=2)

    ft_cfg = FinetuneConfig(epochs=ft_epochs, batch_size=batch, unfreeze_layers=40,
                            warmup_epochs=1 if ft_epochs > 1 else 0)
    # finetune's rate for this many training images per class (its default gives rates by data size)
    ft_cfg = ft_cfg.model_copy(update={"learning_rate": ft_cfg.peak_rate(len(train_y) / len(classes))})
    start = unfreeze_top(base, ft_cfg, get_spec("mobilenet_v2").default_unfreeze_layers)
    lr, schedule_source = schedule(ft_cfg, len(train_ds))
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=ft_cfg.label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    ft_timer = EpochTimer()
    history = model.fit(train_ds, validation_data=validation_data, epochs=ft_epochs,
                        callbacks=[*validation, ft_timer], verbose=2)
val_loss, val_accuracy = model.evaluate(val_ds, verbose=0)

steady = ft_timer.seconds[1:] or ft_timer.seconds  # the first epoch includes tracing/XLA compilation
result = {
    "backend": backend, "devices": devices, "on_gpu": on_gpu, "mixed_precision": on_gpu,
    "replicas": plan.replicas, "data_parallel": plan.kind,
    "tensorflow_imported": "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None,
    "setup": {"backbone": "mobilenet_v2", "alpha": alpha, "image_size": size, "weights": weights,
              "classes": classes, "train_images": len(train_y), "val_images": len(val_y), "batch_size": batch,
              "head_epochs": head_epochs, "finetune_epochs": ft_epochs, "unfreeze_layers": ft_cfg.unfreeze_layers,
              "trainable_backbone_layers": sum(1 for l in base.layers[start:] if l.trainable),
              "schedule": schedule_source},
    "decode_seconds": round(decode_seconds, 2),
    "head_epoch_seconds": [round(s, 2) for s in head_timer.seconds],
    "finetune_epoch_seconds": [round(s, 2) for s in ft_timer.seconds],
    "finetune_images_per_s": round(len(train_y) * len(steady) / sum(steady), 1),
    "val_accuracy_per_epoch": [round(float(a), 4) for a in history.history["val_accuracy"]],
    "val_accuracy": round(float(val_accuracy), 4),
}
if reference and Path(reference).is_file():
    ref = json.loads(Path(reference).read_text())
    delta = abs(result["val_accuracy"] - ref["val_accuracy"])
    result["parity"] = {"reference_backend": ref["backend"], "reference_devices": ref["devices"],
                        "reference_val_accuracy": ref["val_accuracy"],
                        "reference_images_per_s": ref["finetune_images_per_s"],
                        "abs_diff": round(delta, 4), "tolerance": parity_tolerance, "ok": delta <= parity_tolerance}
out_json.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("backend", "devices", "replicas", "finetune_images_per_s", "val_accuracy")}))
PY
}

gpu_utilisation_summary() {  # mean/max of the nvidia-smi samples taken while the driver ran
  "$PY" - "$1" "$2" <<'PY'
import json, sys
rows = [l.split(",") for l in open(sys.argv[1]) if l.strip() and l[0].isdigit()]
util = [float(r[0]) for r in rows]; mem = [float(r[1]) for r in rows]
summary = {"samples": len(util), "utilization_mean_pct": round(sum(util) / len(util), 1) if util else None,
           "utilization_max_pct": max(util) if util else None, "memory_used_max_mib": max(mem) if mem else None}
result = json.load(open(sys.argv[2])); result["nvidia_smi"] = summary
json.dump(result, open(sys.argv[2], "w"), indent=2)
print(json.dumps(summary))
PY
}

make_tiny_subset() {  # 2 colour-coded classes, 8 train + 4 val images each (the dry run's data)
  "$PY" - "$1" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1])
for c, (name, colour) in enumerate([("red", (200, 30, 30)), ("blue", (30, 30, 200))]):
    for split, count in (("train", 8), ("val", 4)):
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng(100 * c + i + (50 if split == "val" else 0))
            px = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (60, 72, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / split / name / f"{i:02d}.jpg", quality=90)
PY
}

make_subset() {  # CLASSES flower classes, TRAIN/VAL_PER_CLASS images each, re-encoded at 256 px (small to carry)
  "$PY" - "$SOURCE" "$1" "$CLASSES" "$TRAIN_PER_CLASS" "$VAL_PER_CLASS" <<'PY'
import sys
from pathlib import Path
from PIL import Image
source, root = Path(sys.argv[1]), Path(sys.argv[2])
classes, n_train, n_val = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
for name in sorted(d.name for d in source.iterdir() if d.is_dir())[:classes]:
    files = sorted(p for p in (source / name).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:n_train + n_val]
    for i, f in enumerate(files):
        split = "train" if i < n_train else "val"
        (root / split / name).mkdir(parents=True, exist_ok=True)
        with Image.open(f) as img:
            img = img.convert("RGB"); img.thumbnail((256, 256))
            img.save(root / split / name / f.name, quality=90)
PY
}

case "$MODE" in
  dry)
    # Quick and CPU-only: tiny settings, random weights unless a KERAS_HOME with the seeded weights is set.
    IMAGE_SIZE=64 ALPHA=0.35 HEAD_EPOCHS=1 FT_EPOCHS=2 BATCH=8
    data="$OUT_DIR/subset"; rm -rf "$data"; make_tiny_subset "$data"
    weights="${GPU_CHECK_WEIGHTS:-none}"
    KERAS_BACKEND=tensorflow driver "$data" "$OUT_DIR/cpu_reference.json" "$weights" ""
    KERAS_BACKEND=jax JAX_PLATFORMS=cpu GPU_CHECK_BLOCK_TF=1 driver "$data" "$OUT_DIR/gpu.json" "$weights" \
      "$OUT_DIR/cpu_reference.json"
    echo "nvidia-smi: skipped (dry run)"
    ;;
  prepare)
    rm -rf "$CARRY/subset" "$CARRY/keras" "$CARRY/cpu_reference.json"; mkdir -p "$CARRY/keras/models" "$CARRY/wheels"
    make_subset "$CARRY/subset"
    seeded="${TP_SHARED_DIR:-$REPO/../shared}/keras/models/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_${ALPHA}_224_no_top.h5"
    cp "$seeded" "$CARRY/keras/models/"
    if [ "$FETCH_WHEELS" = 1 ]; then
      rm -f "$CARRY"/wheels/*.whl
      for pyver in ${GPU_CHECK_PYTHONS:-3.11 3.12}; do  # keras 3.15 needs Python >= 3.11
        "$PY" -m pip download --quiet --only-binary=:all: --python-version "$pyver" --platform manylinux2014_x86_64 \
          --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --dest "$CARRY/wheels" --no-deps \
          keras==3.15.1 namex optree h5py absl-py rich markdown-it-py mdurl pygments pydantic pydantic-core \
          annotated-types typing-inspection typing-extensions pyyaml pillow packaging
      done
    fi
    KERAS_HOME="$CARRY/keras" KERAS_BACKEND=tensorflow driver "$CARRY/subset" "$CARRY/cpu_reference.json" imagenet ""
    du -sh "$CARRY"
    ;;
  gpu)
    command -v nvidia-smi >/dev/null || { echo "gpu_check.sh: no nvidia-smi here (use --dry-run on a CPU)" >&2; exit 3; }
    [ -d "$CARRY/subset" ] || { echo "gpu_check.sh: $CARRY/subset missing: run --prepare and carry the folder" >&2; exit 3; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/gpu_name.txt"
    venv=/tmp/gpu_check_venv
    "$PY" -m venv --system-site-packages "$venv"  # sees the machine's jax/torch; wheels fill in the rest
    "$venv/bin/python" -m pip install --quiet --no-index --find-links "$CARRY/wheels" keras==3.15.1 pydantic pyyaml pillow h5py
    PY="$venv/bin/python"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT_DIR/nvidia_smi.csv" &
    smi=$!
    KERAS_HOME="$CARRY/keras" KERAS_BACKEND=jax GPU_CHECK_BLOCK_TF=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
      driver "$CARRY/subset" "$OUT_DIR/gpu.json" imagenet "$CARRY/cpu_reference.json" || { kill "$smi"; exit 1; }
    kill "$smi"
    gpu_utilisation_summary "$OUT_DIR/nvidia_smi.csv" "$OUT_DIR/gpu.json"
    cp "$CARRY/cpu_reference.json" "$OUT_DIR/"
    ;;
esac
echo "results: $OUT_DIR"
