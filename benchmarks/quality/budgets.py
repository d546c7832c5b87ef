"""The harness's budgets: what each arm trains for, on which data sizes, and how held-out cases are predicted.

Every arm of a dataset gets exactly the same budget (epochs x iterations, validation batches, data-loading
processes, torch threads, device). ``cpu`` is sized so that one arm x seed takes a minute or two on a 2-core machine;
``gpu`` is a real (if short) training on one GPU. On a shared 2-core machine a 32-feature network costs seconds per
iteration, so ``cpu`` divides the planned features per stage by 4 (8, 16, 32, ...) in nnfast's plans and in the
exported nnU-Net plans alike: every arm trains the same smaller network.
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
    features_divisor: int  # the plans' features per stage divided by this (both plans files alike; 1: as planned)
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
    "cpu": Budget(name="cpu", device="cpu", epochs=10, iterations=10, val_iterations=2, workers=1, threads=1,
                  gpu_memory_gb=0.25, features_divisor=4, tta=False, synth_cases=(12, 4),
                  iso_shape=((28, 36), (40, 48), (40, 48)), aniso_shape=((16, 22), (64, 80), (64, 80))),
    "gpu": Budget(name="gpu", device="cuda", epochs=40, iterations=250, val_iterations=50, workers=8, threads=4,
                  gpu_memory_gb=None, features_divisor=1, tta=True, synth_cases=(40, 10),
                  iso_shape=((64, 96), (64, 96), (64, 96)), aniso_shape=((30, 60), (160, 256), (160, 256))),
}
