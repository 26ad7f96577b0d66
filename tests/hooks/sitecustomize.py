"""Test-only changes to libraries, loaded by Python at start-up when tests put this folder on PYTHONPATH (as the
distributed and Slurm tests do for the processes they start). Each is off unless its variable is set.

SFT_TEST_FSDP_ON_CPU=1: accelerate turns FSDP on only for GPU-class devices (AcceleratorState enables it for
  MULTI_GPU and its kin, never for MULTI_CPU); on CPU it silently trains with DDP. This lifts that one gate, the
  way AcceleratorState itself switches a GPU run to FSDP, so that accelerate's FSDP2 code (fully_shard over a
  gloo process group, full-state-dict gathers, FSDP checkpoints) runs on the CPU-only test machines.
SFT_TEST_SAVE_DELAY=SECONDS: every checkpoint save takes that much longer, like a large checkpoint written to
  a slow parallel filesystem.
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
