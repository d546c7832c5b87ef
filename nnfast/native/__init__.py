"""nnfast's compiled core: Numba kernels on arrays, no I/O.

Each kernel is a private ``@njit`` function (``_name``) next to a public wrapper (``name``) that validates its
input, allocates the output and calls the kernel. JIT flags, the thread policy of both worker pools
(``workers x threads <= cores``), warm-up (only the signatures the pipeline passes; shared by a pool's workers, or
started in the background) and the slab threads of one case (``run_slabs``: the cached serial kernels on slabs, on
the cores a process has to itself) live in ``_jit``.

Modules
-------
crop            nonzero mask with 6-connected hole filling, bounding boxes (nnU-Net's ``crop_to_nonzero``)
intensity       per-case foreground summaries and equal-weight mixture statistics (fingerprint percentiles)
resample        order-3 B-spline image resampling (skimage ``resize`` parity), separate-z
resample_seg    one-pass one-hot linear label resampling (batchgenerators 0.25.5 decision rule), separate-z
class_locations per-class foreground voxel sampling (nnU-Net's ``_sample_foreground_locations``)
normalize       fused CT / z-score normalization (float32 arithmetic as nnU-Net's)
augment         one-pass spatial resampling of image channels and one-hot labels for augmentation (2D/3D)
augment_intensity  blur, statistics, gamma, low-resolution resizing, masking/relabelling for augmentation
ds_targets      deep-supervision targets of a patch at every scale, index tables built once per patch shape
components      connected components (full connectivity) and largest-component filtering (postprocessing)
confusion       joint (reference, prediction) label histograms: all TP/FP/FN/TN in one pass (evaluation)
morphology      binary dilation/erosion/opening/closing with nnU-Net's ball/disk, exact, O(voxels) (cascade)
argmax          running argmax over class groups, its merge, softmax: O(voxels) export of many-class logits
"""
from ._jit import available_cores, limit_threads, threads_per_worker, warmup

__all__ = ["available_cores", "limit_threads", "threads_per_worker", "warmup"]
