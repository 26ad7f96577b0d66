"""Test-only changes to libraries, loaded by Python at start-up when tests put this folder on PYTHONPATH (as the
distributed and Slurm tests do for the processes they start). Each is off unless its variable is set.

SFT_TEST_FSDP_ON_CPU=1: accelerate turns FSDP on only for GPU-class devices (AcceleratorState enables it for
  MULTI_GPU and its kin, never for MULTI_CPU); on CPU it silently trains with DDP. This lifts that one gate, the
  way AcceleratorState itself switches a GPU run to FSDP, so that accelerate's FSDP2 code (fully_shard over a
  gloo process group, full-state-dict gathers, FSDP checkpoints) runs on the CPU-only test machines.
SFT_TEST_SAVE_DELAY=SECONDS: every checkpoint save takes that much longer, like a large checkpoint written to
  a slow parallel filesystem.
SFT_TEST_STEP_DELAY=SECONDS: every training step takes that much longer, like a bigger model's step (a run of a
  few hundred steps then outlasts a short Slurm time limit).
SFT_TEST_KILL_AT=POINT: the process SIGKILLs itself at one point of a run, as a node failure or the OOM killer
  would: `load` (opening the model's weights), `step:N` (step N computed, its optimizer update not yet applied),
  `save:TEXT` (half of a safetensors file written whose path contains TEXT, e.g. checkpoint-9 or .final.partial).
"""
import os

if os.environ.get("SFT_TEST_FSDP_ON_CPU") == "1":
    import accelerate.state

    _accelerator_state_init = accelerate.state.AcceleratorState.__init__

    def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == accelerate.state.DistributedType.MULTI_CPU:
            self.distributed_type = accelerate.state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = self.distributed_type

    accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if os.environ.get("SFT_TEST_SAVE_DELAY"):
    import time

    import transformers

    _save_checkpoint = transformers.Trainer._save_checkpoint

    def _slow_save_checkpoint(self, *args, **kwargs):
        time.sleep(float(os.environ["SFT_TEST_SAVE_DELAY"]))
        return _save_checkpoint(self, *args, **kwargs)

    transformers.Trainer._save_checkpoint = _slow_save_checkpoint

if os.environ.get("SFT_TEST_STEP_DELAY"):
    import time

    import transformers

    _training_step_of = transformers.Trainer.training_step

    def _slow_training_step(self, *args, **kwargs):
        time.sleep(float(os.environ["SFT_TEST_STEP_DELAY"]))
        return _training_step_of(self, *args, **kwargs)

    transformers.Trainer.training_step = _slow_training_step

if os.environ.get("SFT_TEST_KILL_AT"):
    import signal

    import safetensors
    import safetensors.torch

    _kill_at = os.environ["SFT_TEST_KILL_AT"]

    def _die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if _kill_at == "load":
        def _open_and_die(*args, **kwargs):
            _die()

        safetensors.safe_open = _open_and_die  # read by `from safetensors import safe_open` in transformers
    elif _kill_at.startswith("step:"):
        import transformers

        _training_step = transformers.Trainer.training_step

        def _step_and_die(self, *args, **kwargs):
            loss = _training_step(self, *args, **kwargs)
            if self.state.global_step + 1 == int(_kill_at.removeprefix("step:")):
                _die()
            return loss

        transformers.Trainer.training_step = _step_and_die
    elif _kill_at.startswith("save:"):
        _save_file = safetensors.torch.save_file

        def _save_half_and_die(tensors, filename, *args, **kwargs):
            _save_file(tensors, filename, *args, **kwargs)
            if _kill_at.removeprefix("save:") in str(filename):
                with open(filename, "r+b") as f:
                    f.truncate(os.path.getsize(filename) // 2)
                _die()

        safetensors.torch.save_file = _save_half_and_die  # before transformers imports it
