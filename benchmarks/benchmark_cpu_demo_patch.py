"""Forward time of trainers' networks at the demo's 3D patch on the CPU (process CPU time and wall time).

    python benchmarks/benchmark_cpu_demo_patch.py WORKDIR/nnUNet_preprocessed/Dataset152_MNI152Tissues/nnUNetPlans.json \
        nnUNetTrainer nnUNetTrainerUMambaBot nnUNetTrainerUMambaEnc nnUNetTrainerLoGVMamba --threads 2

Each network is built by its trainer from the plans' 3d_fullres configuration (1 input channel, 4 classes, no
deep supervision), run once to warm up, then timed over ``--repeats`` forward passes at the plan's batch size
without gradients; the minimum is reported. Process CPU time is given next to wall time because it is less
sensitive to other jobs on a shared machine; on free cores wall time is about CPU time / threads.
"""
import argparse
import contextlib
import io
import json
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", help="nnUNetPlans.json written by `nnunetv2_mamba demo`")
    parser.add_argument("trainers", nargs="+", help="trainer class names (nnUNetTrainer is PlainConvUNet)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with open(args.plans) as handle:
        plans_manager = PlansManager(json.load(handle))
    configuration = plans_manager.get_configuration("3d_fullres")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(configuration.batch_size, 1, *configuration.patch_size)
    print(f"patch {configuration.patch_size}, batch {configuration.batch_size}, {args.threads} threads")
    reference = None
    for name in args.trainers:
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = recursive_find_trainer_class_by_name(name)
        network = trainer.build_network_architecture(plans_manager, configuration, 1, 4, False).eval()
        cpu, wall = [], []
        with torch.no_grad():
            network(x)
            for _ in range(args.repeats):
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                network(x)
                cpu.append(time.process_time() - cpu_start)
                wall.append(time.perf_counter() - wall_start)
        reference = reference if reference is not None else min(cpu)
        print(f"{name:28s} forward: cpu {min(cpu):6.2f} s  wall {min(wall):6.2f} s  "
              f"cpu x {args.trainers[0]}: {min(cpu) / reference:5.2f}", flush=True)


if __name__ == "__main__":
    main()
