"""The Python entry point: a ready model from any checkpoint ``dida`` reads, and image-level prediction.

>>> import dida
>>> model = dida.load_model("work_dirs/demo/dida/latest.pth")   # or an mmcv checkpoint, an export, hf://...
>>> labels = model.predict("frankfurt_000000_000294_leftImg8bit.png")   # [H, W] uint8 train ids
>>> overlay = model.overlay("frankfurt_000000_000294_leftImg8bit.png", labels)  # [H, W, 3] uint8 RGB

``predict`` takes a file path or an RGB uint8 array ``[H, W, 3]`` and handles everything the test pipeline
does: the keep-ratio resize to the model's test scale, the ImageNet normalisation (mean (123.675, 116.28,
103.53), std (58.395, 57.12, 57.375) on the 0-255 RGB scale), whole or sliding-window inference as the run was
evaluated, and the resize back to the input's size. The settings come from the run's configuration stored in
the checkpoint (``Predictor.settings`` says where they came from).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from dida.config import Config
    from dida.models.base import BaseSegmentor

__all__ = ["Predictor", "load_model"]

ImageInput = str | os.PathLike[str] | np.ndarray


@dataclass
class Predictor:
    """A segmentor in eval mode with the settings to run it on images.

    Attributes:
        model: the network (``dida.models.BaseSegmentor``), in eval mode on ``device``.
        cfg: its configuration (``cfg.data.val.img_scale``, ``cfg.eval`` are used by ``predict``).
        device: where it runs; amp: "off", "bf16" or "fp16".
        settings: where the configuration came from (and what was assumed).
    """

    model: BaseSegmentor
    cfg: Config
    device: torch.device
    amp: str
    settings: str

    @property
    def class_names(self) -> list[str]:
        from dida.constants import class_names

        return class_names(self.cfg.model.num_classes)

    @property
    def img_scale(self) -> tuple[int, int]:
        """(long side, short side) of the keep-ratio test resize."""
        return int(self.cfg.data.val.img_scale[0]), int(self.cfg.data.val.img_scale[1])

    def _bgr(self, image: ImageInput) -> np.ndarray:
        from dida.data.transforms import load_image
        from dida.errors import DataError

        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise DataError(f"predict: expected an RGB uint8 array [H, W, 3], got {image.dtype} "
                                f"{list(image.shape)}. Convert it with np.asarray(pil_image.convert('RGB')).")
            return np.ascontiguousarray(image[..., ::-1])
        return load_image(image)

    @torch.no_grad()
    def predict(self, image: ImageInput) -> np.ndarray:
        """Train-id map ``[H, W]`` (uint8) of an image file or an RGB uint8 array, at the input's size."""
        from dida.engine.predict import predict_image

        e = self.cfg.eval
        return predict_image(self.model, self._bgr(image), img_scale=self.img_scale, device=self.device,
                             amp=self.amp, mode=e.mode, crop_size=e.crop_size, stride=e.stride)

    def overlay(self, image: ImageInput, labels: np.ndarray | None = None, opacity: float = 0.5) -> np.ndarray:
        """The palette colours of ``labels`` (default: ``predict(image)``) blended over the image, RGB uint8."""
        from dida.visualize import overlay

        bgr = self._bgr(image)
        labels = self.predict(image) if labels is None else labels
        return overlay(bgr, labels, opacity, self.cfg.model.num_classes)[..., ::-1].copy()


def load_model(checkpoint: str | os.PathLike[str], *, which: str = "model", config: str | None = None,
               device: str | torch.device = "auto", amp: str = "off", allow_pickle: bool = False) -> Predictor:
    """A ready ``Predictor`` from any checkpoint ``dida`` reads.

    Args:
        checkpoint: a dida checkpoint (``work_dirs/RUN/latest.pth``), an mmcv DAFormer / DIDA / HRDA checkpoint,
            an exported model folder, or an ``hf://ORG/REPO`` reference.
        which: the student ("model", what the reference evaluates) or the EMA teacher ("ema_model").
        config: a preset or YAML to use instead of the configuration stored in the checkpoint (needed for
            checkpoints that store none, when the defaults do not fit).
        device: "auto" (a GPU when there is one), "cpu", "cuda", "cuda:N".
        amp: "off", "bf16" or "fp16" autocast for the forward.
        allow_pickle: trust a checkpoint that needs arbitrary Python objects (unsafe unpickling).

    Raises:
        dida.errors.DidaError: an unreadable checkpoint, an unknown model, a configuration that does not fit.
    """
    from dida.checkpoint import load_checkpoint, read_checkpoint
    from dida.engine.checkpoint_config import config_for_checkpoint
    from dida.hub import resolve
    from dida.models import build_model
    from dida.runtime import inference_precision, resolve_device

    path = Path(resolve(str(checkpoint), which=which))
    ckpt = read_checkpoint(path, allow_pickle=allow_pickle)
    resolved = config_for_checkpoint(ckpt, where=str(checkpoint), config=config)
    model = build_model(resolved.cfg.model)
    load_checkpoint(model, ckpt, which=which, source=str(checkpoint))
    dev = resolve_device(device)
    model, amp = inference_precision(model.to(dev).eval(), amp)  # bf16: the weights themselves
    return Predictor(model=model, cfg=resolved.cfg, device=dev, amp=amp, settings=resolved.describe())
