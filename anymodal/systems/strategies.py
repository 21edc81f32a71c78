"""DeepSpeed ZeRO on CPU processes: Lightning's DeepSpeedStrategy with its CUDA-only steps replaced.

Lightning refuses DeepSpeed on any accelerator but CUDA, checks device indices that CPU devices do not
have, and DeepSpeed JIT-compiles a shared-memory allreduce op (~50 s on 2 cores) the first time it sets up
its communication. `CPUDeepSpeedStrategy` skips the first two and, unless asked, the build (gloo does every
collective then). It runs ZeRO-2 and ZeRO-3 with several CPU processes, which is what the distributed tests
(tests/test_distributed.py) and benchmarks/distributed_memory.py use; GPU runs use Lightning's own
`deepspeed_stage_2` / `deepspeed_stage_3` (recipes/strategy/zero2.yaml, zero3.yaml).

    Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(stage=3))
"""

from __future__ import annotations

import importlib

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO on CPU processes that talk over gloo.

    Args:
        stage: ZeRO stage: 2 shards gradients and optimizer state, 3 the parameters too.
        shm_allreduce: build DeepSpeed's shared-memory allreduce op (a one-time ~50 s JIT compile into
            TORCH_EXTENSIONS_DIR); off, gloo does the collectives.
        process_group_backend: gloo (CPU).
        logging_batch_size_per_gpu: the batch size DeepSpeed's throughput log divides by; Lightning's "auto"
            reads it from the train loader's sampler, which anymodal's loaders (whole batches) do not have.
        **kwargs: the rest of Lightning's DeepSpeedStrategy arguments.
    """

    def __init__(self, stage: int = 2, shm_allreduce: bool = False, process_group_backend: str = "gloo",
                 logging_batch_size_per_gpu: int | str = 1, **kwargs) -> None:
        super().__init__(stage=stage, process_group_backend=process_group_backend,
                         logging_batch_size_per_gpu=logging_batch_size_per_gpu, **kwargs)
        self.shm_allreduce = shm_allreduce

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own raises on anything but a CUDA accelerator

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # DeepSpeed compares the device's index with the rank

    def setup_distributed(self) -> None:
        reset_seed()  # what DeepSpeedStrategy.setup_distributed does, without its device-index check
        self.set_world_ranks()
        if not self.shm_allreduce:
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        self._init_deepspeed_distributed()
