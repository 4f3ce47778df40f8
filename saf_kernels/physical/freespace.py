"""Free-space (incoherent, intensity) layers whose weight tiles can be misaligned.

A :class:`FreeSpaceLinear` layer displays each output unit's kernel (the ``in_shape`` image of
its weights) centred in a tile of ``tile`` pixels; ``grid`` tiles make one frame (one
spatial-light-modulator frame, the paper's 3 x 4 tiles of 32 x 30 pixels for 28 x 28 kernels).
The input image is projected onto each tile's kernel window and the detector sums the product,
so the layer computes ``x @ W^T + b`` with ``W`` read through the frame *as the optics see it*:
after an affine misalignment of the whole frame (rotation in degrees about the frame centre,
shift in pixels, scale about the centre), the window of each tile holds resampled pixels,
parts of the neighbouring tiles' kernels or zeros.

The misalignment is device state (four 0-d buffers ``rotation``, ``shift_x``, ``shift_y``,
``scale``, outside ``state_dict()``), not a trainable parameter: the resampling is
differentiable with respect to the weights but *not* with respect to the misalignment (the
sampling positions are computed without gradient), which is why SAT estimates its effect by
finite differences (:class:`saf_kernels.physical.ModelFreeAscent`). The knobs are tensors, so
changing them costs no host synchronisation.

Resampling: ``"bilinear"`` (default; area-like weighting of the four nearest pixels, so a
sub-pixel shift changes the weights continuously) or ``"nearest"`` (the paper's choice, with
``floor(q + 0.5)`` rounding: a shift of 0.5 px moves nothing and 0.6 px moves by a whole pixel,
so the loss is piecewise constant in the shift). At zero misalignment both are exactly the
identity.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ._common import PhysicalLayer, pair_of_ints, real, select_layers

KNOBS = ("rotation", "shift_x", "shift_y", "scale")
_NEUTRAL = {"rotation": 0.0, "shift_x": 0.0, "shift_y": 0.0, "scale": 1.0}
INTERPOLATIONS = ("bilinear", "nearest")


def _window_coords(in_shape, tile, grid, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame coordinates (row, column) of every kernel pixel of every tile: two [T, kh, kw]."""
    (kh, kw), (th, tw), (gr, gc) = in_shape, tile, grid
    oy, ox = (th - kh) // 2, (tw - kw) // 2
    tr = torch.arange(gr, device=device, dtype=dtype).repeat_interleave(gc)
    tc = torch.arange(gc, device=device, dtype=dtype).repeat(gr)
    ys = (tr * th + oy)[:, None, None] + torch.arange(kh, device=device, dtype=dtype)[None, :, None]
    xs = (tc * tw + ox)[:, None, None] + torch.arange(kw, device=device, dtype=dtype)[None, None, :]
    t = gr * gc
    return ys.expand(t, kh, kw), xs.expand(t, kh, kw)


def misalign_kernels(
    kernels: torch.Tensor,
    tile,
    grid,
    *,
    rotation=0.0,
    shift_x=0.0,
    shift_y=0.0,
    scale=1.0,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """The kernels ``[O, kh, kw]`` as read through misaligned frames.

    Kernels are laid out ``grid = (rows, cols)`` per frame, each centred in a ``tile = (th, tw)``
    cell (offset ``((th - kh) // 2, (tw - kw) // 2)``); ``ceil(O / (rows * cols))`` frames, the
    last one padded with zeros. Every frame is transformed about its centre ``c`` as
    ``p = c + t + scale * R(rotation) (q - c)`` (``t = (shift_x, shift_y)`` pixels, ``R``
    counter-clockwise as displayed with row 0 at the top) and read back at each tile's kernel
    window; pixels that come from outside the frame are 0. The misalignment values may be
    floats or 0-d tensors; no gradient flows to them. Differentiable in ``kernels``.
    """
    fn = "misalign_kernels"
    if kernels.dim() != 3:
        raise ValueError(f"{fn}: kernels must be [O, kh, kw], got shape {tuple(kernels.shape)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{fn}: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    for name, v in (("rotation", rotation), ("shift_x", shift_x), ("shift_y", shift_y), ("scale", scale)):
        if not isinstance(v, torch.Tensor):  # a device tensor is not read back (no synchronisation)
            real(name, v, fn, positive=(name == "scale"))
    o, kh, kw = kernels.shape
    th, tw = pair_of_ints(tile, "tile", fn)
    gr, gc = pair_of_ints(grid, "grid", fn)
    if th < kh or tw < kw:
        raise ValueError(f"{fn}: tile {(th, tw)} is smaller than the kernel {(kh, kw)}")
    t = gr * gc
    frames = -(-o // t)
    h, w = gr * th, gc * tw
    dev, dt = kernels.device, kernels.dtype
    # Lay the kernels out in frames [F, H, W].
    oy, ox = (th - kh) // 2, (tw - kw) // 2
    k = kernels
    if frames * t != o:
        k = torch.cat([k, k.new_zeros(frames * t - o, kh, kw)])
    k = F.pad(k, (ox, tw - kw - ox, oy, th - kh - oy))
    flat = k.reshape(frames, gr, gc, th, tw).permute(0, 1, 3, 2, 4).reshape(frames, h * w)
    with torch.no_grad():
        ys, xs = _window_coords((kh, kw), (th, tw), (gr, gc), dev, dt)
        knob = {n: torch.as_tensor(v, device=dev, dtype=dt) for n, v in
                zip(KNOBS, (rotation, shift_x, shift_y, scale))}
        cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
        ang = knob["rotation"] * (math.pi / 180.0)
        cos, sin = torch.cos(ang), torch.sin(ang)
        u = (xs - cx - knob["shift_x"]) / knob["scale"]
        v = (ys - cy - knob["shift_y"]) / knob["scale"]
        qx = cx + u * cos - v * sin
        qy = cy + u * sin + v * cos
        if interpolation == "nearest":
            corners = [(torch.floor(qy + 0.5), torch.floor(qx + 0.5), torch.ones_like(qx))]
        else:
            y0, x0 = torch.floor(qy), torch.floor(qx)
            fy, fx = qy - y0, qx - x0
            corners = [
                (y0, x0, (1 - fy) * (1 - fx)),
                (y0, x0 + 1, (1 - fy) * fx),
                (y0 + 1, x0, fy * (1 - fx)),
                (y0 + 1, x0 + 1, fy * fx),
            ]
        taps = []
        for yi, xi, wt in corners:
            inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
            idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().reshape(-1)
            taps.append((idx, (wt * inside).reshape(-1)))
    out = None
    for idx, wt in taps:
        term = flat.index_select(1, idx) * wt
        out = term if out is None else out + term
    return out.reshape(frames * t, kh, kw)[:o]


class FreeSpaceLinear(PhysicalLayer):
    """A fully connected layer of an incoherent free-space optical network.

    ``y = x W^T + b``, ``W = misalign(control)`` (see the module docstring): ``control`` holds the
    displayed pixel values, one ``in_shape`` kernel per output unit (transmissions in
    ``[-max_weight, max_weight]``, signed as the paper's model, e.g. differential detection;
    :meth:`constrain_` clamps them there, as the paper does after each step); the bias is
    digital. ``x`` is ``[..., kh * kw]`` (a flattened image).

    Misalignment buffers: ``rotation`` (degrees), ``shift_x``, ``shift_y`` (pixels), ``scale``
    (1 = none); :meth:`set_misalignment` or :func:`misalignment` change them.
    """

    def __init__(
        self,
        in_shape,
        out_features: int,
        bias: bool = True,
        *,
        tile=None,
        grid=(3, 4),
        max_weight: float = 1.0,
        interpolation: str = "bilinear",
        device=None,
        dtype=None,
    ):
        super().__init__()
        fn = "FreeSpaceLinear"
        self.in_shape = pair_of_ints(in_shape, "in_shape", fn)
        kh, kw = self.in_shape
        self.tile = pair_of_ints(tile if tile is not None else (kh + 4, kw + 2), "tile", fn)
        self.grid = pair_of_ints(grid, "grid", fn)
        if self.tile[0] < kh or self.tile[1] < kw:
            raise ValueError(f"{fn}: tile {self.tile} is smaller than in_shape {self.in_shape}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"{fn}: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.interpolation = interpolation
        self.max_weight = real("max_weight", max_weight, fn, positive=True)
        self.in_features, self.out_features = kh * kw, _checks.integer(out_features, "out_features", fn, lo=1)
        _checks.flag(bias, "bias", fn)
        factory = {"device": device, "dtype": dtype}
        ref = nn.Linear(self.in_features, self.out_features, bias=bias, **factory)
        self.control = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        for name in KNOBS:
            self.register_buffer(
                name, torch.tensor(_NEUTRAL[name], dtype=self.control.dtype, device=self.control.device),
                persistent=False,
            )

    @property
    def knobs(self) -> dict[str, torch.Tensor]:
        """The misalignment buffers by name (the tensors themselves: writing to them misaligns)."""
        return {n: getattr(self, n) for n in KNOBS}

    @torch.no_grad()
    def set_misalignment(self, *, rotation=None, shift_x=None, shift_y=None, scale=None) -> None:
        """Set any of the misalignment values (the others stay)."""
        fn = f"{type(self).__name__}.set_misalignment"
        for name, v in zip(KNOBS, (rotation, shift_x, shift_y, scale)):
            if v is not None:
                getattr(self, name).fill_(real(name, v, fn, positive=(name == "scale")))

    @property
    def weight(self) -> torch.Tensor:
        """``[out, in]`` weights as the misaligned optics apply them."""
        kh, kw = self.in_shape
        k = misalign_kernels(
            self.control.reshape(self.out_features, kh, kw), self.tile, self.grid,
            interpolation=self.interpolation, **self.knobs,
        )
        return k.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def constrain_(self) -> None:
        self.control.clamp_(-self.max_weight, self.max_weight)

    def extra_repr(self) -> str:
        return (
            f"in_shape={self.in_shape}, out_features={self.out_features}, tile={self.tile}, grid={self.grid}, "
            f"interpolation={self.interpolation!r}, bias={self.bias is not None}"
        )


@contextlib.contextmanager
def misalignment(
    model: nn.Module, *, rotation=None, shift_x=None, shift_y=None, scale=None, layers=None
) -> Iterator[list[FreeSpaceLinear]]:
    """Inside the block the chosen free-space layers (default: all) are misaligned by the given
    values (degrees, pixels, scale factor; the others stay as they are); restored on exit.
    Naming a layer without tiles (an MRR or a digital layer) raises ``ValueError``."""
    fn = "misalignment"
    values = {n: v for n, v in zip(KNOBS, (rotation, shift_x, shift_y, scale)) if v is not None}
    if not values:
        raise ValueError(f"{fn}: give at least one of {', '.join(KNOBS)}")
    for n, v in values.items():
        real(n, v, fn, positive=(n == "scale"))
    mods = select_layers(model, FreeSpaceLinear, layers, fn, "tiles to misalign")
    saved = [{n: getattr(m, n).clone() for n in values} for m in mods]
    try:
        for m in mods:
            m.set_misalignment(**values)
        yield mods
    finally:
        with torch.no_grad():
            for m, s in zip(mods, saved):
                for n, t in s.items():
                    getattr(m, n).copy_(t)
