"""The harness's budgets: what each arm trains for, on which data sizes, and how held-out cases are predicted.

Every arm of a dataset gets exactly the same budget (epochs x iterations, validation batches, data-loading
processes, torch threads, device). ``cpu`` is sized so that one arm x seed takes a minute or two on a 2-core machine;
``gpu`` is a real (if short) training on one GPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Budget:
    name: str
    device: str
    epochs: int
    iterations: int  # training batches per epoch
    val_iterations: int  # validation batches per epoch (pseudo-Dice only; not the score)
    workers: int  # data-loading processes of training (validation: max(1, workers // 2), as nnU-Net)
    threads: int  # torch intra-op threads of the training process
    gpu_memory_gb: float | None  # the plans' memory target (None: nnU-Net's 8 GB)
    tta: bool  # mirroring test-time augmentation when predicting the held-out cases
    synth_cases: tuple[int, int]  # (training, held-out) cases of each synthetic set
    iso_shape: tuple[tuple[int, int], ...]  # (z, y, x) shape ranges of the synthetic sets
    aniso_shape: tuple[tuple[int, int], ...]

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations

    def to_json(self) -> dict:
        return asdict(self)


BUDGETS = {
    "cpu": Budget(name="cpu", device="cpu", epochs=10, iterations=25, val_iterations=4, workers=1, threads=1,
                  gpu_memory_gb=0.25, tta=False, synth_cases=(12, 4),
                  iso_shape=((28, 36), (40, 48), (40, 48)), aniso_shape=((16, 22), (64, 80), (64, 80))),
    "gpu": Budget(name="gpu", device="cuda", epochs=40, iterations=250, val_iterations=50, workers=8, threads=4,
                  gpu_memory_gb=None, tta=True, synth_cases=(40, 10),
                  iso_shape=((64, 96), (64, 96), (64, 96)), aniso_shape=((30, 60), (160, 256), (160, 256))),
}
