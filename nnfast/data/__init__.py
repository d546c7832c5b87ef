"""Training data: patch sampling, loading and augmentation (nnU-Net v2's ``nnUNetDataLoader`` + batchgeneratorsv2).

Modules
-------
sampler         which cases, forced-foreground samples and enlarged patch boxes (nnU-Net's ``get_bbox``)
augment_params  augmentation settings per configuration, per-sample spatial parameters, the stored region a
                sample needs (``needed_region``)
transforms      nnU-Net's training/validation transforms on one sample (resampling, intensity, mirroring,
                deep-supervision targets)
"""
