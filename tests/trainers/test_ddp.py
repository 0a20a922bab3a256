"""What nnU-Net's DDP (``-num_gpus N``) needs from the plugin, checked on the CPU.

* Every concrete trainer's network gives every trainable parameter a gradient in one real nnU-Net train step with the
  loss nnU-Net builds under DDP (DistributedDataParallel with find_unused_parameters=False, nnU-Net's default, fails
  on the next step otherwise).
* Two gloo processes run nnU-Net's own ``initialize`` (batch split, SyncBatchNorm conversion, DDP wrap, DDP loss)
  and ``train_step``: gradients are averaged (parameters equal across ranks and equal to one process on the
  concatenated batch) and no unused-parameter error occurs.
* The per-rank batch size / oversampling split for world size 2 is nnU-Net's.
* benchmarks/ddp_session.sh (the two-GPU run) is valid bash.
"""
import copy
import functools
import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module

from nnunetv2_mamba.data.video_plan import add_vivim_configurations
from nnunetv2_mamba.trainers.discovery import concrete_trainers
from tests import builders
from tests.trainers import test_logvmamba, test_taming, test_umamba, test_vivim

REPO = Path(__file__).resolve().parents[2]
TRAINERS = concrete_trainers()


def make_trainer(trainer_class, tmp_path, monkeypatch):
    """Return an initialised trainer of any family on its tiny test plans (3d_fullres or its Vivim configuration)."""
    family = trainer_class.__module__.rsplit(".", 1)[-1]
    tests_of_family = {"umamba": test_umamba, "taming": test_taming, "logvmamba": test_logvmamba}
    if family in tests_of_family:
        tests = tests_of_family[family]
        return builders.make_trainer(trainer_class, tests.make_plans(), "3d_fullres", tests.DATASET_JSON, tmp_path,
                                     monkeypatch)
    assert family == "vivim", f"no tiny plans for the trainer family {family!r} ({trainer_class.__name__})"
    test_vivim.make_trainer_folders(tmp_path, monkeypatch)
    plans = add_vivim_configurations(test_vivim.planned_plans(median=(6, 32, 32)))
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training adds this key before constructing
    configuration = "3d_fullres_vivim_v3" if trainer_class.vivim_mixer == "st_v3" else "3d_fullres_vivim"
    trainer = trainer_class(plans, configuration, 0, copy.deepcopy(test_vivim.DATASET_JSON), torch.device("cpu"))
    trainer.initialize()
    return trainer


def make_batch(trainer, batch_size, seed):
    """Return a batch as nnU-Net's data loader makes it, with every label of the trainer's dataset."""
    return builders.make_batch(trainer, batch_size, seed, num_labels=len(trainer.label_manager.all_labels))


def use_ddp_loss(trainer):
    """Rebuild the trainer's loss as nnU-Net's _build_loss does under DDP (lowest DS output weighted 1e-6, not 0)."""
    trainer.is_ddp = True
    try:
        trainer.loss = trainer._build_loss()
    finally:
        trainer.is_ddp = False  # nothing else of DDP (all_gather in the epoch hooks) applies in one process


# ------------------------------------------------------------------------------------------------------------
# 1. No unused parameters: every trainable parameter gets a gradient in a real train step
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trainer_class", [cls for _, cls in TRAINERS], ids=[name for name, _ in TRAINERS])
def test_every_parameter_gets_a_gradient_in_a_ddp_train_step(trainer_class, tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    trainer = make_trainer(trainer_class, tmp_path, monkeypatch)
    use_ddp_loss(trainer)
    if trainer.enable_deep_supervision:
        assert min(trainer.loss.weight_factors) > 0, "under DDP nnU-Net weights every deep-supervision output"
        assert trainer.network.decoder.deep_supervision is True
    trainer.network.train()
    result = trainer.train_step(make_batch(trainer, batch_size=2, seed=0))
    assert np.isfinite(result["loss"])
    trainable = [(name, p) for name, p in trainer.network.named_parameters() if p.requires_grad]
    assert trainable
    no_gradient = [name for name, p in trainable if p.grad is None]
    assert no_gradient == [], f"{trainer_class.__name__}: parameters without a gradient (DDP with " \
                              f"find_unused_parameters=False fails on them): {no_gradient}"
    not_finite = [name for name, p in trainable if not torch.isfinite(p.grad).all()]
    assert not_finite == [], f"{trainer_class.__name__}: non-finite gradients: {not_finite}"


# ------------------------------------------------------------------------------------------------------------
# 2. nnU-Net's DDP path on two gloo processes (CPU): nnU-Net's initialize and train_step, gradients averaged
# ------------------------------------------------------------------------------------------------------------

GLOO_TRAINERS = ["nnUNetTrainerUMambaBot", "nnUNetTrainerSegMamba"]  # one U-Mamba, one Taming network
STEPS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flat_parameters(network) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in network.parameters()])


def _cpu_ddp(module, device_ids=None):
    # nnU-Net passes device_ids=[local_rank] (one GPU per process); a CPU module takes none.
    return torch.nn.parallel.DistributedDataParallel(module)


def _initialize_on_cpu(self, original_initialize):
    # nnU-Net's __init__ moves a DDP worker to cuda:local_rank and makes a CUDA GradScaler; keep both on the CPU.
    self.device, self.grad_scaler = torch.device("cpu"), None
    original_initialize(self)


def gloo_worker(rank, world_size, port, workdir, result_path):
    """One DDP rank: nnU-Net's initialize and two train steps per trainer of GLOO_TRAINERS on its share of the batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    trainers = dict(concrete_trainers())
    results = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(nnunet_trainer_module, "DDP", _cpu_ddp)
        base = nnunet_trainer_module.nnUNetTrainer
        monkeypatch.setattr(base, "initialize", functools.partialmethod(_initialize_on_cpu, base.initialize))
        for name in GLOO_TRAINERS:
            trainer = make_trainer(trainers[name], Path(workdir) / name / f"rank{rank}", monkeypatch)
            assert trainer.is_ddp and isinstance(trainer.network, torch.nn.parallel.DistributedDataParallel)
            assert min(trainer.loss.weight_factors) > 0  # nnU-Net's DDP loss
            trainer.network.module.load_state_dict(torch.load(Path(workdir) / f"{name}_initial.pt"))
            trainer.network.train()
            start = sum(gathered_int(trainer.batch_size)[:rank])  # this rank's first sample in the global batch
            losses = []
            for step in range(STEPS):  # each rank trains on its own samples of the global batch
                batch = make_batch(trainer, trainer.configuration_manager.batch_size, seed=step)
                mine = slice(start, start + trainer.batch_size)
                batch = {"data": batch["data"][mine], "target": [t[mine] for t in batch["target"]]}
                losses.append(float(trainer.train_step(batch)["loss"]))
            parameters = flat_parameters(trainer.network)
            gathered = [torch.empty_like(parameters) for _ in range(world_size)]
            dist.all_gather(gathered, parameters)
            split = [None] * world_size
            dist.all_gather_object(split, (trainer.batch_size, trainer.oversample_foreground_percent, losses))
            # nnU-Net's single-GPU loss weights the lowest output 0: DDP must then refuse the next step.
            trainer.is_ddp = False
            trainer.loss = trainer._build_loss()
            trainer.is_ddp = True
            unused_error = ""
            try:
                for step in range(2):
                    trainer.train_step(make_batch(trainer, trainer.batch_size, seed=10 + step))
            except RuntimeError as error:
                unused_error = str(error)
            results[name] = {"parameters": gathered, "split": split, "unused_error": unused_error}
    if rank == 0:
        torch.save(results, result_path)
    dist.barrier()
    dist.destroy_process_group()


def gathered_int(value: int):
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def test_nnunet_ddp_on_two_gloo_processes_averages_gradients(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    trainers = dict(concrete_trainers())
    reference = {}
    for name in GLOO_TRAINERS:  # one process on the concatenated batch, same initial weights, same (DDP) loss
        torch.manual_seed(0)
        trainer = make_trainer(trainers[name], tmp_path / name / "single", monkeypatch)
        torch.save(trainer.network.state_dict(), tmp_path / f"{name}_initial.pt")
        use_ddp_loss(trainer)
        trainer.network.train()
        initial = flat_parameters(trainer.network)
        for step in range(STEPS):
            trainer.train_step(make_batch(trainer, trainer.configuration_manager.batch_size, seed=step))
        reference[name] = (initial, flat_parameters(trainer.network))
    result_path = tmp_path / "ddp_result.pt"
    mp.spawn(gloo_worker, args=(2, free_port(), str(tmp_path), str(result_path)), nprocs=2, join=True)
    results = torch.load(result_path)
    for name in GLOO_TRAINERS:
        initial, single = reference[name]
        rank0, rank1 = results[name]["parameters"]
        assert not torch.equal(rank0, initial), f"{name}: the DDP steps did not train"
        torch.testing.assert_close(rank0, rank1, rtol=0, atol=0, msg=f"{name}: ranks diverged")
        torch.testing.assert_close(rank0, single, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: DDP differs from one process on the whole batch: {m}")
        (size0, oversample0, losses0), (size1, oversample1, losses1) = results[name]["split"]
        assert (size0, size1) == (1, 1) and (oversample0, oversample1) == (0.0, 1.0)
        assert losses0 != losses1, "each rank must have trained on its own samples"
        assert "finished reduction in the prior iteration" in results[name]["unused_error"], \
            "DDP must refuse a loss that leaves the lowest deep-supervision head without a gradient"


# ------------------------------------------------------------------------------------------------------------
# 3. Batch size and oversampling split over two ranks, as nnU-Net's DDP splits them
# ------------------------------------------------------------------------------------------------------------

# nnU-Net's rule (2.8.1): the global batch is split as evenly as possible, lower ranks first; the last
# round(batch * 0.33) samples of the global batch are foreground-oversampled, so rank 1 gets them.
NNUNET_SPLIT_WORLD_2 = {2: [(1, 0.0), (1, 1.0)], 5: [(3, 0.0), (2, 1.0)], 12: [(6, 0.0), (6, 2 / 3)]}


def split_for(trainer_class, global_batch_size, rank, monkeypatch):
    trainer = object.__new__(trainer_class)  # the method reads only these attributes
    trainer.is_ddp, trainer.oversample_foreground_percent = True, 0.33
    trainer.configuration_manager = SimpleNamespace(batch_size=global_batch_size)
    monkeypatch.setattr(nnunet_trainer_module.dist, "get_world_size", lambda *args: 2)
    monkeypatch.setattr(nnunet_trainer_module.dist, "get_rank", lambda *args: rank)
    trainer._set_batch_size_and_oversample()
    return trainer.batch_size, trainer.oversample_foreground_percent


@pytest.mark.parametrize("trainer_class", [cls for _, cls in TRAINERS], ids=[name for name, _ in TRAINERS])
def test_batch_split_for_two_ranks_is_nnunets(trainer_class, monkeypatch):
    for global_batch_size, expected in NNUNET_SPLIT_WORLD_2.items():
        got = [split_for(trainer_class, global_batch_size, rank, monkeypatch) for rank in range(2)]
        assert [size for size, _ in got] == [size for size, _ in expected]
        np.testing.assert_allclose([oversample for _, oversample in got], [o for _, o in expected])
        assert got == [split_for(nnunet_trainer_module.nnUNetTrainer, global_batch_size, rank, monkeypatch)
                       for rank in range(2)]


# ------------------------------------------------------------------------------------------------------------
# 4. The two-GPU session script
# ------------------------------------------------------------------------------------------------------------

SESSION_SCRIPT = REPO / "benchmarks" / "ddp_session.sh"


def test_ddp_session_script_is_valid_bash_and_its_trainers_load(tmp_path):
    checked = subprocess.run(["bash", "-n", str(SESSION_SCRIPT)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    script = SESSION_SCRIPT.read_text()
    assert "export NCCL_NVLS_ENABLE=0" in script and "-num_gpus" in script and "--c" in script
    # The <Trainer>_ddp module the script writes for nnUNet_extTrainer: one short-schedule variant per trainer.
    module_text = script.split("ddp_session_trainers.py\" <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    namespace = {"__name__": "ddp_session_trainers"}
    exec(compile(module_text, "ddp_session_trainers.py", "exec"), namespace)
    for name, cls in TRAINERS:
        variant = namespace[f"{name}_ddp"]
        assert issubclass(variant, cls) and variant.__name__ == f"{name}_ddp"
