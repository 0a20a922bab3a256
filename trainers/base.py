"""Behaviour shared by every nnunetv2-mamba trainer: plan reading, compile policy, what-trains log, fp32 variants,
and the reliability layer (atomic checkpoints, clear resume/load errors, skipped non-finite steps, out-of-memory report)."""
from __future__ import annotations

import collections
import contextlib
import json
import os
from typing import Dict, List, Tuple, Union

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_mamba.io import atomic_write
from nnunetv2_mamba.layers.precision import MIXER_DTYPE_ENV_VAR, mixer_dtype
from nnunetv2_mamba.plans import NetworkPlan, PlanError
from nnunetv2_mamba.reliability import (CHECKPOINT_KEY, CHECKPOINT_NAMES, CheckpointError, MambaOutOfMemoryError,
                                        NonFiniteLossCounter, atomic_torch_save, channel_mismatch_message,
                                        check_checkpoint_version, check_requested_backend, checkpoint_metadata,
                                        guard_out_of_memory, load_checkpoint_file, missing_continue_message,
                                        out_of_memory_message)
from nnunetv2_mamba.ssm import BACKEND_ENV_VAR, BackendError, select_backend_for
from nnunetv2_mamba.ssm.backends.triton_backend import preferred_min_length
from nnunetv2_mamba.ssm.scan import requested_backend_name


class nnUNetTrainerMambaBase(nnUNetTrainer):
    """Base of the plugin's trainers. A subclass sets ``network_family`` and implements ``build_network``."""

    #: Human-readable network name, shown by ``nnunetv2_mamba list``.
    network_family: str = ""
    #: Spatial dimensionalities the network supports (2 and/or 3).
    supported_dims: Tuple[int, ...] = (2, 3)
    #: False for abstract bases: they are not listed and cannot train.
    is_concrete: bool = False

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """Return the network for this configuration (nnU-Net 2.8 signature; the predictor calls it too)."""
        plan = NetworkPlan.from_nnunet(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels)
        plan.require_dim(cls.supported_dims, f"{cls.__name__} ({cls.network_family})")
        return guard_out_of_memory(cls.build_network(plan, enable_deep_supervision))

    @classmethod
    def build_network(cls, plan: NetworkPlan, enable_deep_supervision: bool) -> nn.Module:
        """Return the network built from plain plan arguments."""
        raise NotImplementedError(f"{cls.__name__} does not define a network.")

    def _do_i_compile(self) -> bool:
        # The selective scan is a custom autograd Function / CUDA extension: torch.compile graph-breaks on it
        # and has been reported to produce NaN with mamba_ssm, so compile stays off.
        return False

    def network_summary(self) -> Dict[str, object]:
        """Return what trains: network class, parameter counts, scan backend on this device, precision policy."""
        network = unwrap_network(self.network)
        parameters = list(network.parameters())
        mixers_fp32 = bool(getattr(network, "mixer_fp32", True))  # every family but MultiSegMamba (§0.6)
        amp = self.device.type == "cuda" and self.grad_scaler is not None
        scan_dtype = (mixer_dtype(self.device.type, amp) if mixers_fp32 else
                      torch.float16 if amp else torch.float32)
        return {"network_class": f"{type(network).__module__}.{type(network).__qualname__}",
                "network_parameters": sum(p.numel() for p in parameters),
                "network_trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
                "scan_backend": describe_scan_backends(network, self.device, scan_dtype),
                "precision": precision_policy(self.device.type, isinstance(self, NoAMPMixin), mixers_fp32)}

    def print_plans(self):
        """nnU-Net's plans printout, then the network that is actually built (the plans may name another one)."""
        super().print_plans()
        if self.local_rank == 0:
            summary = self.network_summary()
            self.print_to_log_file(
                "nnunetv2_mamba: the network that trains\n"
                f"  network class:  {summary['network_class']}\n"
                f"  parameters:     {summary['network_parameters']:,} "
                f"({summary['network_trainable_parameters']:,} trainable)\n"
                f"  scan backend:   {summary['scan_backend']}\n"
                f"  precision:      {summary['precision']}\n", add_timestamp=False)

    def _save_debug_information(self):
        """nnU-Net's debug.json plus the network summary (the same values as the training log)."""
        super()._save_debug_information()
        if self.local_rank == 0:
            path = os.path.join(self.output_folder, "debug.json")
            with open(path) as handle:
                debug = json.load(handle)
            debug.update(self.network_summary())
            atomic_write(path, json.dumps(debug, sort_keys=True, indent=4))  # nnU-Net's save_json layout

    # --------------------------------------------------------------------------------------------------------
    # Reliability: checkpoints are written atomically and carry the plugin version; resume errors are clear.
    # --------------------------------------------------------------------------------------------------------

    #: Gradient-norm clipping of the training step (nnU-Net's value; a recipe may set its own).
    grad_clip_norm: float = 12.0
    #: Training stops with NonFiniteLossError after this many consecutive non-finite losses (each is skipped).
    max_consecutive_nonfinite_losses: int = 20

    def checkpoint_content(self) -> dict:
        """Return what ``save_checkpoint`` writes: nnU-Net 2.8's checkpoint plus the plugin's version."""
        return {
            "network_weights": unwrap_network(self.network).state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            CHECKPOINT_KEY: checkpoint_metadata(),
        }

    def save_checkpoint(self, filename: str) -> None:
        """Write the checkpoint atomically: a crash during the write leaves the previous file loadable."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        atomic_torch_save(self.checkpoint_content(), filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """nnU-Net's load_checkpoint with clear errors for missing/damaged files and a plugin-version check."""
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, (str, os.PathLike)):
            source = str(filename_or_checkpoint)
            checkpoint = load_checkpoint_file(source, map_location=self.device)
        else:
            source, checkpoint = "the checkpoint", filename_or_checkpoint
        warning = check_checkpoint_version(checkpoint, source)
        if warning is not None:
            self.print_to_log_file(f"WARNING: {warning}")
        network = unwrap_network(self.network)
        own_keys = network.state_dict().keys()
        # Checkpoints of nn.DataParallel/DDP modules carry a 'module.' prefix (as nnU-Net's heuristic).
        weights = {key[len("module."):] if key not in own_keys and key.startswith("module.") else key: value
                   for key, value in checkpoint["network_weights"].items()}
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        try:
            network.load_state_dict(weights)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            missing = own_keys - weights.keys()
            unexpected = weights.keys() - own_keys
            raise CheckpointError(
                f"{source} does not fit {type(network).__name__} of {self.__class__.__name__} with this plan "
                f"({len(missing)} missing, {len(unexpected)} unexpected weights; {first_line}). "
                f"{warning or ''} Load it with the trainer, plans and configuration it was trained "
                f"with ({checkpoint.get('trainer_name')}, configuration "
                f"{checkpoint.get('init_args', {}).get('configuration')}).".replace("  ", " ")) from None
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    def on_train_start(self):
        check_requested_backend()  # a misspelled / uninstalled forced backend fails before any work
        # nnU-Net starts a new training when --c finds no checkpoint; say which files exist and what to pass.
        if self.logger.resume and self.current_epoch == 0 and self.output_folder is not None and \
                not any(os.path.isfile(os.path.join(self.output_folder, name)) for name in CHECKPOINT_NAMES):
            self.print_to_log_file(f"WARNING: {missing_continue_message(self.output_folder)}")
        super().on_train_start()

    # --------------------------------------------------------------------------------------------------------
    # Reliability: non-finite losses are skipped and counted; out of GPU memory gives one message.
    # --------------------------------------------------------------------------------------------------------

    @property
    def nonfinite_losses(self) -> NonFiniteLossCounter:
        """The counter of skipped non-finite steps of this run (epoch, iteration of each)."""
        if getattr(self, "_nonfinite_losses", None) is None:
            self._nonfinite_losses = NonFiniteLossCounter(self.max_consecutive_nonfinite_losses)
        return self._nonfinite_losses

    def on_train_epoch_start(self):
        self._iteration_in_epoch = 0
        super().on_train_epoch_start()

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).all()
        if getattr(self, "is_ddp", False):
            # Every rank must skip the same step, or DDP's gradient all-reduce would wait forever.
            finite = finite.to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def optimizer_step(self, loss: torch.Tensor) -> bool:
        """Backward, clip at ``grad_clip_norm`` and step (through the GradScaler if any); return False if skipped.

        A non-finite loss is not backpropagated: the weights, the optimizer state and the GradScaler's scale
        stay as they were (the scaler would otherwise halve its scale for a step that is no overflow of its own).
        """
        iteration = getattr(self, "_iteration_in_epoch", 0)
        self._iteration_in_epoch = iteration + 1
        if not self._loss_is_finite(loss):
            counter = self.nonfinite_losses
            self.print_to_log_file(f"Non-finite loss ({loss.detach().float().cpu().item()}) at epoch "
                                   f"{self.current_epoch} iteration {iteration}: step skipped "
                                   f"({counter.consecutive + 1} in a row, {len(counter.skipped) + 1} in this run)")
            counter.record(self.current_epoch, iteration)
            return False
        self.nonfinite_losses.reset_run()
        if getattr(self, "grad_scaler", None) is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.optimizer.step()
        return True

    def _out_of_memory(self, error: BaseException, data: torch.Tensor, step: str) -> MambaOutOfMemoryError:
        network = f"{self.network_family or type(unwrap_network(self.network)).__name__} ({self.__class__.__name__})"
        return MambaOutOfMemoryError(out_of_memory_message(network, tuple(data.shape[2:]), data.shape[0], error,
                                                           self.device, step))

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's training step (autocast on CUDA), through ``optimizer_step``."""
        data = batch["data"].to(self.device, non_blocking=True)
        expected = getattr(self, "num_input_channels", None)
        if expected is not None and data.shape[1] != expected:
            raise PlanError(channel_mismatch_message(data.shape[1], expected,
                                                     self.dataset_json.get("channel_names")))
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            # As nnU-Net: autocast only on CUDA (slow on CPU, unsupported on MPS).
            with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else \
                    contextlib.nullcontext():
                output = self.network(data)
                loss = self.loss(output, target)
            self.optimizer_step(loss)
        except MambaOutOfMemoryError:
            raise  # the network's forward reported it (message with the network's own name)
        except torch.cuda.OutOfMemoryError as error:
            raise self._out_of_memory(error, data, "training") from None
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        try:
            return super().validation_step(batch)
        except MambaOutOfMemoryError:
            raise
        except torch.cuda.OutOfMemoryError as error:
            raise self._out_of_memory(error, batch["data"], "validation") from None

    def on_train_epoch_end(self, train_outputs: List[dict]):
        # Skipped steps report a non-finite loss; the epoch's train loss is the mean of the applied ones.
        applied = [output for output in train_outputs if np.all(np.isfinite(output["loss"]))]
        skipped = len(train_outputs) - len(applied)
        if skipped:
            self.print_to_log_file(f"{skipped} of {len(train_outputs)} training steps of epoch {self.current_epoch} "
                                   f"were skipped (non-finite loss)")
        super().on_train_epoch_end(applied or train_outputs)


def unwrap_network(network: nn.Module) -> nn.Module:
    """Return the plain network inside DDP / torch.compile wrappers."""
    network = getattr(network, "module", network)  # DistributedDataParallel
    return getattr(network, "_orig_mod", network)  # torch.compile


def describe_scan_backends(network: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """Return the scan backend(s) the network's selective scans will use on ``device`` (automatic choice resolved).

    Every 2D ``A..._log`` parameter (D, N) is one selective scan (core Mamba ``A_log``, ST-Mamba v3's ``A_b_log`` /
    ``A_s_log`` branches, LoG-VMamba's ``A_logs``); its module's ``backend`` attribute, else
    $NNUNETV2_MAMBA_BACKEND, else the automatic choice decides, as in the scan itself.
    """
    chosen = collections.Counter()
    problems = []
    for module in network.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not (name.startswith("A") and "_log" in name) or parameter.dim() != 2:
                continue
            try:
                chosen[select_backend_for(1, parameter.shape[1], device, dtype,
                                          getattr(module, "backend", None)).name] += 1
            except BackendError as error:
                problems.append(str(error))
    if not chosen and not problems:
        return "none (this network has no selective scan)"
    forced = requested_backend_name()
    how = f"forced by ${BACKEND_ENV_VAR}={forced}" if forced != "auto" else "automatic choice"
    used = ", ".join(f"{name} ({count} selective scan{'s' * (count != 1)})" for name, count in chosen.most_common())
    if forced == "auto" and used:  # e.g. triton ahead of mamba_ssm on a 128^3 stage's 2^21 tokens
        long_length = preferred_min_length()
        try:
            long_backend = select_backend_for(long_length, 16, device, dtype).name
        except BackendError:
            long_backend = None
        if long_backend is not None and long_backend not in chosen:
            how += f"; scans of {long_length} tokens or more with d_state <= 64: {long_backend}"
    text = f"{used} on {device} ({how})" if used else ""
    if problems:
        text += ("; " if text else "") + f"{len(problems)} selective scan(s) cannot run: {problems[0]}"
    return text


def precision_policy(device_type: str, no_amp: bool, mixers_fp32: bool = True) -> str:
    """Return the training precision in words (nnU-Net autocasts and scales gradients only on CUDA)."""
    if no_amp:
        return ("NoAMP fp32: training and validation steps without autocast or GradScaler (inference keeps "
                "nnU-Net's autocast)")
    if device_type != "cuda":
        return f"fp32 (nnU-Net uses no autocast and no GradScaler on {device_type})"
    if not mixers_fp32:
        mixers = "Mamba mixers under autocast (scan state accumulated in fp32)"
    elif mixer_dtype(device_type, True) is torch.bfloat16:
        mixers = (f"Mamba mixers under bf16 autocast (LayerNorm and scan state in fp32; "
                  f"${MIXER_DTYPE_ENV_VAR}=fp32 for the references' fp32 mixers)")
    else:
        mixers = "Mamba mixers in fp32 (autocast off inside)"
    return f"fp16 AMP (autocast + GradScaler), {mixers}"


class _Fp32Forward(nn.Module):
    """Calls the wrapped network with autocast disabled and fp32 input (used only during a step)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.network(x.float())


class NoAMPMixin:
    """fp32 training and validation steps (no autocast, no GradScaler); gradient clipping stays at 12.

    nnU-Net's own steps are reused: the network is called through an fp32 wrapper for the step, and without
    a GradScaler nnU-Net takes its plain backward / clip(12) / step path. Inference is unchanged.
    """

    def initialize(self):
        super().initialize()
        self.grad_scaler = None

    @contextlib.contextmanager
    def _fp32_network(self):
        network = self.network
        self.network = _Fp32Forward(network)
        try:
            yield
        finally:
            self.network = network

    def train_step(self, batch: dict) -> dict:
        with self._fp32_network():
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self._fp32_network():
            return super().validation_step(batch)
