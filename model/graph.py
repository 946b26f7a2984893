"""The exported serving graph: fastai's validation-time batch transforms, then ``learn.model``, with its features.

ONNX input ``input``: (N, C, H, W) float32, the images after the input type's mode conversion, the item
transforms, ToTensor and IntToFloatTensor (model/preprocess.py; C = 3 for PILImage, 1 for PILImageBW).
Outputs: ``logits`` (N, classes) and, when the model has one, ``features`` (N, D).

Batch steps (model/spec.py reads them from ``learn.dls.valid.after_batch``, in fastai's order):

* ``resample``: a batch resize, i.e. fastai's AffineCoordTfm(size=...) (what ``aug_transforms(size=...)`` adds;
  presizing) or RandomResizedCropGPU, at validation. There the affine matrix is the identity and warps are
  skipped, so the op is ``affine_coord``: ``F.affine_grid(identity)`` then ``_grid_sample``, which first
  area-downsamples when the resize shrinks by more than 2x ("hack to get smoother downwards resampling",
  including its ``coords.shape[-2]`` quirk: the height is divided by the *output width*) and then calls
  ``F.grid_sample`` with the transform's mode, padding_mode and align_corners. With a fixed input size that
  whole chain is a fixed linear map, separable in height and width: we compute each axis's weights once at
  export time (float64, with torch's own float32 grid coordinates), keep the few non-zero taps per output
  pixel, and replay them as gathers and sums, rows first (measured at load 11, 460 -> 224 px, batch 1: 14 ms gathers,
  22 ms dense matmuls, ~290 ms ORT's GridSample after an area resize; ONNX has no adaptive pooling for
  non-divisible sizes). Equal to fastai within float rounding (tests compare against fastai's own
  affine_coord for every mode/padding/align_corners, up- and downscaling).
* ``normalize``: ``(x - mean) / std`` with fastai's (1, C, 1, 1) statistics, broadcast exactly as fastai does.

Features: the input of the model's last ``nn.Linear`` (the layer whose output is the logits), taken with a
forward hook, at export time as in TorchPredictor. For a plain Sequential/XResNet (the demo) that is the pooled
body features (128 for the demo). For fastai's ``vision_learner`` head (concat-pool, BN, dropout,
Linear(2*nf, 512), ReLU, BN, dropout, Linear(512, classes)) it is the 512-d hidden layer, not the 2*nf concat
pool: (1) it is the space the classifier is linear in, so the logits are a linear function of it and scores
built on it (Mahalanobis with a shared covariance, energy, kNN) see exactly what the decision sees; (2) it is the
part trained on the user's classes (after ``fine_tune`` the body is mostly ImageNet's), and (3) 512 numbers
instead of 1024 (resnet18/34; 4096 for resnet50) halve what a covariance must be estimated from with a small
calibration folder. One rule for every architecture: whatever the head, "the input of the last Linear".
A model whose logits come from no single Linear (e.g. a conv head) has no ``features`` output.
"""

from __future__ import annotations

import numpy as np

FEATURES = "features"


# ---- the batch resize, per axis ----------------------------------------------------------------------------
def _reflect(x: np.ndarray, twice_low: int, twice_high: int) -> np.ndarray:
    # aten/src/ATen/native/GridSampler.h reflect_coordinates
    if twice_low == twice_high:
        return np.zeros_like(x)
    lo, span = twice_low / 2, (twice_high - twice_low) / 2
    x = np.abs(x - lo)
    extra, flips = np.fmod(x, span), np.floor(x / span)
    return np.where(flips % 2 == 0, extra + lo, span - extra + lo)


def _pad_index(ix: np.ndarray, size: int, pad_mode: str, align_corners: bool) -> np.ndarray:
    # GridSampler.h compute_coordinates: border clips; reflection reflects, then clips; zeros leaves it alone
    if pad_mode in ("border", "reflection"):
        if pad_mode == "reflection":
            ix = _reflect(ix, 0, 2 * (size - 1)) if align_corners else _reflect(ix, -1, 2 * size - 1)
        ix = np.clip(ix, 0, size - 1)
    elif pad_mode != "zeros":
        raise ValueError(f"unknown padding mode {pad_mode!r}")
    return ix


def _cubic(t: np.ndarray) -> list[np.ndarray]:
    # UpSample.h get_cubic_upsample_coefficients, A = -0.75: taps at floor(x) - 1 .. floor(x) + 2
    a = -0.75
    x1, x2 = t, 1 - t
    return [((a * (x1 + 1) - 5 * a) * (x1 + 1) + 8 * a) * (x1 + 1) - 4 * a,
            ((a + 2) * x1 - (a + 3)) * x1 * x1 + 1,
            ((a + 2) * x2 - (a + 3)) * x2 * x2 + 1,
            ((a * (x2 + 1) - 5 * a) * (x2 + 1) + 8 * a) * (x2 + 1) - 4 * a]


def grid_sample_matrix(coords: np.ndarray, size: int, mode: str, pad_mode: str, align_corners: bool) -> np.ndarray:
    """(len(coords), size) weights of F.grid_sample along one axis, for normalised float32 grid coordinates."""
    c = coords.astype(np.float32)
    one, two = np.float32(1), np.float32(2)
    if align_corners:  # grid_sampler_unnormalize, in the kernel's float32
        ix = ((c + one) / two) * np.float32(size - 1)
    else:
        ix = ((c + one) * np.float32(size) - one) / two
    ix = ix.astype(np.float64)
    if mode == "nearest":
        taps = [(np.rint(_pad_index(ix, size, pad_mode, align_corners)), np.ones_like(ix))]  # round half to even
    elif mode == "bilinear":
        ix = _pad_index(ix, size, pad_mode, align_corners)
        x0 = np.floor(ix)
        taps = [(x0, 1 - (ix - x0)), (x0 + 1, ix - x0)]
    elif mode == "bicubic":  # padding applies to each tap's index, not to the coordinate
        x0 = np.floor(ix)
        taps = [(np.trunc(_pad_index(x0 + k, size, pad_mode, align_corners)), w)
                for k, w in zip(range(-1, 3), _cubic(ix - x0), strict=True)]
    else:
        raise ValueError(f"unsupported grid_sample mode {mode!r}")
    m = np.zeros((len(c), size))
    rows = np.arange(len(c))
    for idx, w in taps:
        ok = (idx >= 0) & (idx < size)  # out of bounds: zeros padding (border/reflection never get here)
        np.add.at(m, (rows[ok], idx[ok].astype(int)), w[ok])
    return m


def area_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of adaptive_avg_pool along one axis (what F.interpolate(mode='area') runs)."""
    m = np.zeros((size_out, size_in))
    for i in range(size_out):
        start, end = (i * size_in) // size_out, ((i + 1) * size_in + size_out - 1) // size_out
        m[i, start:end] = 1.0 / (end - start)
    return m


def resample_matrices(step: dict) -> tuple[np.ndarray, np.ndarray]:
    """Dense (out, in) matrices for height and width of one ``resample`` step: crop, fastai's area pre-pass
    (when it applies), then grid_sample; ``out = Mh @ x @ Mw.T`` per channel."""
    import torch
    import torch.nn.functional as F

    (h, w), (ho, wo) = step["in_size"], step["size"]
    crop_h, crop_w = np.eye(h), np.eye(w)
    if step["crop"] is not None:
        top, left, ch, cw = step["crop"]
        crop_h, crop_w, h, w = crop_h[top:top + ch], crop_w[left:left + cw], ch, cw
    ac = step["align_corners"]
    coords = F.affine_grid(torch.eye(2, 3)[None], [1, 1, ho, wo], align_corners=ac)  # fastai's identity grid
    mid_h, mid_w = np.eye(h), np.eye(w)
    if step["mode"] == "bilinear":  # fastai's _grid_sample, same expressions, same float types
        mn, mx = coords.min(), coords.max()
        z = 1 / (mx - mn).item() * 2
        d = min(h / coords.shape[-2], w / coords.shape[-1]) / 2
        if d > 1 and d > z:
            ah, aw = F.interpolate(torch.zeros(1, 1, h, w), scale_factor=1 / d, mode="area",
                                   recompute_scale_factor=True).shape[-2:]
            mid_h, mid_w, h, w = area_matrix(h, ah), area_matrix(w, aw), ah, aw
    gx, gy = coords[0, 0, :, 0].numpy(), coords[0, :, 0, 1].numpy()
    mh = grid_sample_matrix(gy, h, step["mode"], step["pad_mode"], ac) @ mid_h @ crop_h
    mw = grid_sample_matrix(gx, w, step["mode"], step["pad_mode"], ac) @ mid_w @ crop_w
    return mh, mw


def sparse_taps(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A banded (out, in) matrix as (out, K) input indices and float32 weights (padding taps: index 0, weight 0)."""
    k = max(1, int((m != 0).sum(axis=1).max()))
    idx, wts = np.zeros((m.shape[0], k), dtype=np.int64), np.zeros((m.shape[0], k), dtype=np.float32)
    for i, row in enumerate(m):
        nz = np.flatnonzero(row)
        idx[i, : len(nz)], wts[i, : len(nz)] = nz, row[nz]
    return idx, wts


def _modules():
    import torch
    from torch import nn

    class Resample(nn.Module):
        """One ``resample`` step: height and width as K-tap gathers (module docstring)."""

        def __init__(self, step: dict):
            super().__init__()
            mh, mw = resample_matrices(step)
            for name, m in (("h", mh), ("w", mw)):
                idx, wts = sparse_taps(m)
                self.register_buffer(f"idx_{name}", torch.from_numpy(idx))
                self.register_buffer(f"w_{name}", torch.from_numpy(wts))

        def forward(self, x):
            # Rows first: gathering whole rows is a block copy, the per-element gather then runs on Ho rows only.
            x = (x[..., self.idx_h, :] * self.w_h[..., None]).sum(-2)  # (N, C, Ho, K, W) -> (N, C, Ho, W)
            return (x[..., self.idx_w] * self.w_w).sum(-1)  # (N, C, Ho, Wo, K) -> (N, C, Ho, Wo)

    class Normalize(nn.Module):
        def __init__(self, step: dict):
            super().__init__()
            self.register_buffer("mean", torch.tensor(step["mean"], dtype=torch.float32).reshape(step["shape"]))
            self.register_buffer("std", torch.tensor(step["std"], dtype=torch.float32).reshape(step["shape"]))

        def forward(self, x):
            return (x - self.mean) / self.std  # fastai's Normalize.encodes

    class ServingGraph(nn.Module):
        """Batch steps, then the model; returns (logits, features) when a feature layer is named."""

        def __init__(self, model: nn.Module, steps: list[dict], feature_layer: str | None):
            super().__init__()
            self.pre = nn.Sequential(*[{"resample": Resample, "normalize": Normalize}[s["op"]](s) for s in steps])
            self.model = model
            self.feature_layer = feature_layer
            self._seen: list = []
            if feature_layer is not None:
                dict(model.named_modules())[feature_layer].register_forward_hook(self._keep_input)

        def _keep_input(self, module, args, output):
            self._seen.append(args[0])

        def forward(self, x):
            x = self.pre(x)
            if self.feature_layer is None:
                return self.model(x)
            self._seen.clear()
            logits = self.model(x)
            return logits, self._seen[-1]

    return Resample, Normalize, ServingGraph


def batch_steps_module(steps: list[dict]):
    """The batch steps alone, as a torch module (for tests and the export)."""
    from torch import nn

    resample, normalize, _ = _modules()
    return nn.Sequential(*[{"resample": resample, "normalize": normalize}[s["op"]](s) for s in steps])


def serving_graph(model, steps: list[dict], feature_layer: str | None):
    return _modules()[2](model, steps, feature_layer)


def find_feature_layer(model, x) -> tuple[str, int] | None:
    """(name, width) of the model's last-executed nn.Linear if it computes the logits from a (N, D) input
    once per forward; else None. ``x`` is a model input (after the batch transforms)."""
    import torch
    from torch import nn

    seen: list[tuple[str, tuple, tuple]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.append(
        (name, tuple(args[0].shape), tuple(out.shape)))) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.inference_mode():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    if not seen or not isinstance(out, torch.Tensor):
        return None
    name, in_shape, out_shape = seen[-1]
    if sum(n == name for n, _, _ in seen) != 1 or len(in_shape) != 2 or out_shape != tuple(out.shape):
        return None
    return name, int(in_shape[1])


def describe(steps: list[dict]) -> str:
    """One line per batch step, for logs and bundle.json readers."""
    out = []
    for s in steps:
        if s["op"] == "resample":
            out.append(f"resize {s['in_size']} -> {s['size']} ({s['mode']}, {s['pad_mode']}, "
                       f"align_corners={s['align_corners']}{', crop ' + str(s['crop']) if s['crop'] else ''})")
        else:
            out.append(f"normalize ({len(s['mean'])} channel stats)")
    return "; ".join(out) or "none"

