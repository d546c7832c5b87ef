"""Training data: patch sampling, loading and augmentation (nnU-Net v2's ``nnUNetDataLoader`` + batchgeneratorsv2).

Modules
-------
sampler         which cases, forced-foreground samples and enlarged patch boxes (nnU-Net's ``get_bbox``)
augment_params  augmentation settings per configuration, per-sample spatial parameters, the stored region a
                sample needs (``needed_region``)
transforms      nnU-Net's training/validation transforms on one sample (resampling, intensity, mirroring,
                deep-supervision targets)
cascade         the cascade's previous-stage one-hot input channels and their augmentation (binary operators,
                connected-component removal)
dataset         case sources: nnfast zarr stores or nnU-Net's own preprocessed folder (blosc2 + pkl), with the
                cascade's previous stage as a second label channel
batch           one batch built deterministically from (seed, batch index): sample, read the needed region, augment;
                ``BatchSpec.from_plan`` says what a batch is for a plan configuration
heap            keep freed memory in a batch-building process (glibc mallopt): samples reuse pages
loader          PatchLoader(source, spec): worker processes (on :mod:`nnfast.workers`) writing batches into shared
                memory, nnU-Net's batch format
nnunet_adapter  the drop-in for nnU-Net v2's nnUNetTrainer (a trainer subclass, or ``use_nnfast_loader(trainer)``)
"""
