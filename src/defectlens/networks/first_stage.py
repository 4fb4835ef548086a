"""A handle on the first stage (the stem) of a `PretrainedEncoder`: read its output, or add a
perturbation to it while the rest of the network runs on.

Student-teacher corruption models work in feature space: latent noise (Gaussian noise on the
student's stem features) and transfer noise (a difference of teacher stem features added to
the student's). Both need the stem's output inside one forward pass; a forward hook gives it
without touching the backbone's code::

    stem = FirstStage(student)
    with stem.perturbed(lambda features: 0.1 * torch.randn_like(features)):
        features = student(images)          # later layers see stem(images) + noise
    with stem.captured() as stem_output:
        teacher(images)
    stem_output.value                       # (N, C_stem, H / s, W / s)

The stem is the backbone's first selectable layer (`BackboneSpec.layers[0]`): EfficientNet-Lite's
``_conv_stem`` (stride 2, the convolution's output before BN and ReLU6), MobileNetV2's
``features.0`` (stride 2) or ResNet's ``layer1`` (stride 4).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import Tensor, nn

from defectlens.errors import ConfigError
from defectlens.networks.encoder import PretrainedEncoder

Perturbation = Callable[[Tensor], Tensor]
"""Stem output (N, C, h, w) -> what to add to it (same shape)."""


class Captured:
    """The stem output seen during a `FirstStage.captured` block (``value``, or None)."""

    value: Tensor | None = None


class FirstStage:
    """Forward hook on an encoder's first stage (see the module docstring).

    Args:
        encoder: the encoder whose stem is read or perturbed.
    """

    def __init__(self, encoder: PretrainedEncoder) -> None:
        self.name = encoder.spec.layers[0].name
        self.stride = encoder.spec.layers[0].stride
        self.channels = encoder.spec.layers[0].channels
        try:
            module = encoder.network.get_submodule(self.name)
        except AttributeError:
            raise ConfigError(f"backbone {encoder.spec.name!r}: its first layer {self.name!r} is not a module") from None
        self._perturbation: Perturbation | None = None
        self._captured: Captured | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        if self._captured is not None:
            self._captured.value = output.detach()
        if self._perturbation is not None:
            return output + self._perturbation(output)
        return None

    @contextlib.contextmanager
    def perturbed(self, perturbation: Perturbation | None) -> Iterator[None]:
        """Within the block, every forward pass adds ``perturbation(stem output)`` to the stem output."""
        self._perturbation = perturbation
        try:
            yield
        finally:
            self._perturbation = None

    @contextlib.contextmanager
    def captured(self) -> Iterator[Captured]:
        """Within the block, the stem output of the last forward pass is kept (detached)."""
        self._captured = Captured()
        try:
            yield self._captured
        finally:
            self._captured = None

    def remove(self) -> None:
        """Remove the hook."""
        self._handle.remove()
