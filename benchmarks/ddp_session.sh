#!/usr/bin/env bash
# nnU-Net's DDP (-num_gpus 2) for the plugin's trainers, on a two-GPU machine (nvidia-h200-x2). For each trainer:
#   1. nnUNetv2_train DATASET CONF 0 -tr <Trainer>_ddp               (one GPU)
#   2. nnUNetv2_train DATASET CONF 0 -tr <Trainer>_ddp -num_gpus 2   (two GPUs, nnU-Net's DDP over NCCL)
#   3. the same two-GPU run again with --c and two more epochs      (resume from checkpoint_final)
# then checks that the two-GPU run wrote the same files as the one-GPU run (same names, same checkpoint keys and
# shapes, validation summary present), that --c resumed (epoch count and logged losses continue), and reports the
# median train-step time on one and on two GPUs (same global batch: nnU-Net splits it over the ranks).
# <Trainer>_ddp is the trainer on a short schedule (DDP_SESSION_EPOCHS x DDP_SESSION_ITERATIONS) that records the
# time of each train step; it is written below into the work folder and put on nnUNet_extTrainer.
#
# Usage (after `source .gpu/use.sh`, the GPU kit):
#   bash benchmarks/ddp_session.sh list                 # the trainers, one per line
#   TRAINERS="nnUNetTrainerUMambaBot nnUNetTrainerSegMamba" bash benchmarks/ddp_session.sh
#   BACKENDS="triton mamba_ssm" ...                     # $NNUNETV2_MAMBA_BACKEND values to time (default: auto)
# Each trainer takes about 2-3 minutes (three nnU-Net runs); give one device command (10 min) three trainers.
# Default TRAINERS: every concrete trainer (too many for one command: split them). Results go to $OUT:
# ddp_results.jsonl (one line per trainer and backend), ddp_summary.md, and each run's log under logs/.
set -uo pipefail
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on the lent machines (device documentation)
mode="${1:-run}"
out="${OUT:-/tmp/ddp_out}"
work="${DDP_WORK:-/tmp/ddp_work}"
epochs="${DDP_SESSION_EPOCHS:-2}"
run_timeout="${DDP_RUN_TIMEOUT:-420}"  # a DDP hang shows up as exit 124
mkdir -p "$out/logs" "$work/trainers"

if [ "$mode" = list ]; then
  python3 -c "from nnunetv2_mamba.trainers.discovery import concrete_trainers as c; print('\n'.join(n for n, _ in c()))"
  exit 0
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index --use-pep517 -e . > "$out/install.log" 2>&1 \
  || { tail -20 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
gpus=$(nvidia-smi --list-gpus | wc -l)
[ "$gpus" -ge 2 ] || { echo "ddp_session.sh needs two GPUs; this machine has $gpus." >&2; exit 1; }

cat > "$work/trainers/ddp_session_trainers.py" <<'PY'
"""<Trainer>_ddp for every concrete trainer: a short schedule, and the time of every train step per rank."""
import json
import os
import time

import torch

from nnunetv2_mamba.trainers.discovery import concrete_trainers


def _make_ddp_variant(base: type) -> type:
    # nnU-Net records the constructor's arguments by inspecting its signature: keep it explicit.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("DDP_SESSION_EPOCHS", "2"))
        self.num_iterations_per_epoch = int(os.environ.get("DDP_SESSION_ITERATIONS", "25"))
        self.num_val_iterations_per_epoch = 2
        self.step_seconds = []

    def train_step(self, batch: dict) -> dict:
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = base.train_step(self, batch)
        torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - started)
        return result

    def on_train_end(self):
        path = os.path.join(self.output_folder, f"step_seconds_rank{self.local_rank}.json")
        with open(path, "w") as handle:
            json.dump({"batch_size": self.batch_size, "seconds": self.step_seconds}, handle)
        base.on_train_end(self)

    return type(f"{base.__name__}_ddp", (base,), {"__init__": __init__, "train_step": train_step,
                                                  "on_train_end": on_train_end, "__module__": __name__})


for _name, _cls in concrete_trainers():
    globals()[f"{_name}_ddp"] = _make_ddp_variant(_cls)
PY

export nnUNet_raw="$work/raw" nnUNet_preprocessed="$work/preprocessed" nnUNet_extTrainer="$work/trainers"
export nnUNet_compile=f nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-6}"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed"
volume_id=961 video_id=962

prepare() {  # generated datasets, planned and preprocessed once per machine
  if [ ! -d "$nnUNet_preprocessed/Dataset${volume_id}_MambaSynthetic" ]; then
    python3 -c "from nnunetv2_mamba.data.synthetic import make_synthetic_dataset as m
m('$nnUNet_raw', $volume_id, shape=(64, 64, 64), n_train=10)" &&
    nnUNetv2_plan_and_preprocess -d "$volume_id" -c 3d_fullres -np 8 --verify_dataset_integrity \
      > "$out/logs/plan_volume.log" 2>&1 || { tail -20 "$out/logs/plan_volume.log"; return 1; }
  fi
  if [ ! -d "$nnUNet_preprocessed/Dataset${video_id}_VivimVideos" ]; then
    python3 -c "from nnunetv2_mamba.data.synthetic import make_synthetic_videos as m
m('$work/videos', n_videos=10, nframes=8, size=(64, 64), seed=0, prefix='train')" &&
    nnunetv2_mamba video convert "$work/videos" -d "$video_id" --name VivimVideos > "$out/logs/plan_video.log" 2>&1 &&
    nnUNetv2_plan_and_preprocess -d "$video_id" -c 3d_fullres -np 8 --verify_dataset_integrity \
      >> "$out/logs/plan_video.log" 2>&1 &&
    nnunetv2_mamba video plan -d "$video_id" >> "$out/logs/plan_video.log" 2>&1 \
      || { tail -20 "$out/logs/plan_video.log"; return 1; }
  fi
}
prepare || exit 1

train() {  # train LOG RESULTS NUM_GPUS DATASET CONF TRAINER [extra args]: exit status (124: timeout, e.g. a hang)
  local log="$1" results="$2" num_gpus="$3" dataset="$4" conf="$5" trainer="$6"; shift 6
  local started=$SECONDS
  nnUNet_results="$results" timeout "$run_timeout" nnUNetv2_train "$dataset" "$conf" 0 -tr "$trainer" \
    -num_gpus "$num_gpus" "$@" > "$log" 2>&1
  local status=$?
  echo "[exit $status after $((SECONDS - started)) s]" >> "$log"
  return $status
}

trainers="${TRAINERS:-$(bash "$0" list)}"
backends="${BACKENDS:-auto}"
first_backend="${backends%% *}"
for trainer in $trainers; do
  case "$trainer" in
    nnUNetTrainerVivimV3) dataset=$video_id conf=3d_fullres_vivim_v3 ;;
    nnUNetTrainerVivim) dataset=$video_id conf=3d_fullres_vivim ;;
    *) dataset=$volume_id conf=3d_fullres ;;
  esac
  for backend in $backends; do
    tag="${trainer}_${backend}"
    one="$work/results_1gpu_$backend" two="$work/results_2gpu_$backend"
    export NNUNETV2_MAMBA_BACKEND="$backend"
    [ "$backend" = auto ] && unset NNUNETV2_MAMBA_BACKEND
    echo "== $trainer ($conf, backend $backend)"
    train "$out/logs/${tag}_1gpu.log" "$one" 1 "$dataset" "$conf" "${trainer}_ddp"; status_one=$?
    train "$out/logs/${tag}_2gpu.log" "$two" 2 "$dataset" "$conf" "${trainer}_ddp"; status_two=$?
    status_resume=skipped
    if [ "$backend" = "$first_backend" ] && [ "$status_two" = 0 ]; then
      rm -rf "$two-resume" && cp -r "$two" "$two-resume"  # resume a copy: the comparison reads the first run
      DDP_SESSION_EPOCHS=$((epochs + 2)) train "$out/logs/${tag}_2gpu_resume.log" "$two-resume" 2 "$dataset" \
        "$conf" "${trainer}_ddp" --c; status_resume=$?
    fi
    python3 - "$one" "$two" "$two-resume" "$trainer" "$backend" "$status_one" "$status_two" "$status_resume" "$epochs" \
      >> "$out/ddp_results.jsonl" <<'PY'
import json, re, statistics, sys
from pathlib import Path

import torch

one, two, resumed, trainer, backend, status_one, status_two, status_resume, epochs = sys.argv[1:]
epochs = int(epochs)


def fold(results):
    found = sorted(Path(results).glob(f"Dataset*/{trainer}_ddp__nnUNetPlans__*/fold_0"))
    return found[0] if found else None


def files(folder):  # relative names; the training log's timestamp and the per-rank step timings left out
    names = {re.sub(r"training_log_.*\.txt", "training_log_<time>.txt", str(p.relative_to(folder)))
             for p in folder.rglob("*") if p.is_file()}
    return sorted(n for n in names if not n.startswith("step_seconds_rank"))


def median_step(folder, rank=0):
    path = folder / f"step_seconds_rank{rank}.json"
    if not path.is_file():
        return None, None
    record = json.loads(path.read_text())
    seconds = record["seconds"][3:] or record["seconds"]  # the first steps include cuDNN autotuning
    return statistics.median(seconds), record["batch_size"]


def dice(folder):
    path = folder / "validation" / "summary.json"
    return json.loads(path.read_text())["foreground_mean"]["Dice"] if path.is_file() else None


row = {"trainer": trainer, "backend": backend, "exit_1gpu": int(status_one), "exit_2gpu": int(status_two),
       "exit_resume": status_resume}
f1, f2 = fold(one), fold(two)
if f1 is not None and f2 is not None:
    c1 = torch.load(f1 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    c2 = torch.load(f2 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    shapes = lambda c: {k: tuple(v.shape) for k, v in c["network_weights"].items()}
    row["same_files"] = files(f1) == files(f2)
    row["files_only_1gpu"] = sorted(set(files(f1)) - set(files(f2)))
    row["files_only_2gpu"] = sorted(set(files(f2)) - set(files(f1)))
    row["same_checkpoint_keys_and_shapes"] = shapes(c1) == shapes(c2)
    row["ddp_prefix_in_checkpoint"] = any(k.startswith("module.") for k in c2["network_weights"])
    row["dice_1gpu"], row["dice_2gpu"] = dice(f1), dice(f2)
    (row["median_step_s_1gpu"], row["batch_1gpu"]), (row["median_step_s_2gpu"], row["batch_per_gpu_2gpu"]) = \
        median_step(f1), median_step(f2)
    if row["median_step_s_1gpu"] and row["median_step_s_2gpu"]:
        row["speedup_same_global_batch"] = row["median_step_s_1gpu"] / row["median_step_s_2gpu"]
    if status_resume == "0":  # --c continued from checkpoint_final: two more epochs, the logged losses kept
        c3 = torch.load(fold(resumed) / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        row["resumed_epochs"] = c3["current_epoch"]
        row["resume_ok"] = (c3["current_epoch"] == epochs + 2 and len(c3["logging"]["train_losses"]) == epochs + 2
                            and c3["logging"]["train_losses"][:epochs] == c2["logging"]["train_losses"])
print(json.dumps(row))
PY
    tail -1 "$out/ddp_results.jsonl"
  done
done

python3 - "$out/ddp_results.jsonl" > "$out/ddp_summary.md" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
keys = ["trainer", "backend", "exit_1gpu", "exit_2gpu", "exit_resume", "same_files",
        "same_checkpoint_keys_and_shapes", "resume_ok", "dice_1gpu", "dice_2gpu", "median_step_s_1gpu",
        "median_step_s_2gpu", "batch_1gpu", "batch_per_gpu_2gpu", "speedup_same_global_batch"]
fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
print("| " + " | ".join(keys) + " |")
print("|" + "---|" * len(keys))
for row in rows:
    print("| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |")
PY
cat "$out/ddp_summary.md"
