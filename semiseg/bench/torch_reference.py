"""PyTorch references of semiseg's U-Net and autoencoder, written the ordinary PyTorch way (NCHW).

Same layers, widths, paddings and parameter counts as ``semiseg.models`` (the U-Net has 31,033,473
parameters at 6 -> 1 channels, 64 features, depth 4), with ``nn.ConvTranspose2d`` for the up-convs,
``nn.MaxPool2d`` for pooling and ``torch.optim.Adam``; only for timing, never imported by the library.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class DoubleConv(nn.Sequential):
  def __init__(self, cin: int, cout: int):
    super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                     nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


class UNet(nn.Module):
  """Ronneberger's U-Net with padded convs, as ``semiseg.models.unet.UNet``."""

  def __init__(self, in_channels: int = 6, features: int = 64, depth: int = 4, num_outputs: int = 1):
    super().__init__()
    widths = [features * 2 ** level for level in range(depth + 1)]
    self.down = nn.ModuleList(DoubleConv(cin, cout) for cin, cout in zip([in_channels] + widths[:-2], widths[:-1]))
    self.pool = nn.MaxPool2d(2)
    self.bottom = DoubleConv(widths[-2], widths[-1])
    self.upconv = nn.ModuleList(nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
                                for level in range(depth))
    self.up = nn.ModuleList(DoubleConv(2 * widths[level], widths[level]) for level in range(depth))
    self.head = nn.Conv2d(features, num_outputs, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = self.pool(x)
    x = self.bottom(x)
    for level in reversed(range(len(self.up))):
      x = torch.cat([skips[level], self.upconv[level](x)], dim=1)
      x = self.up[level](x)
    return self.head(x)


class ConvAutoencoder(nn.Module):
  """Strided-conv encoder -> Linear(latent) -> mirrored decoder, as ``semiseg.models.autoencoder``."""

  def __init__(self, features: Sequence[int] = (32, 64, 128, 256, 256), latent_dim: int = 500,
               image_size: int = 256, channels: int = 3):
    super().__init__()
    act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
    layers, cin = [], channels
    for f in features:
      layers += [nn.Conv2d(cin, f, 4, stride=2, padding=1), act(), nn.Conv2d(f, f, 3, padding=1), act()]
      cin = f
    self.encoder = nn.Sequential(*layers)
    self.bottom = (features[-1], image_size // 2 ** len(features), image_size // 2 ** len(features))
    size = self.bottom[0] * self.bottom[1] * self.bottom[2]
    self.to_latent = nn.Linear(size, latent_dim)
    self.from_latent = nn.Sequential(nn.Linear(latent_dim, size), act())
    layers = []
    for f in list(reversed(features))[1:] + [features[0]]:
      layers += [nn.ConvTranspose2d(cin, f, 4, stride=2, padding=1), act(), nn.Conv2d(f, f, 3, padding=1), act()]
      cin = f
    layers += [nn.Conv2d(cin, channels, 3, padding=1), nn.Sigmoid()]
    self.decoder = nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    z = self.to_latent(self.encoder(x).flatten(1))
    return self.decoder(self.from_latent(z).view(-1, *self.bottom))


def count_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


class TrainSteps:
  """Adam train steps and inference of the three workloads on one set of shapes (NCHW tensors)."""

  def __init__(self, *, image_size: int, batch_size: int, unet_features: int, unet_depth: int,
               ae_features: Sequence[int], latent_dim: int, device: str = 'cpu', seed: int = 0):
    torch.manual_seed(seed)
    self.device = device
    s, b = image_size, batch_size
    self.ae = ConvAutoencoder(ae_features, latent_dim, s).to(device)
    self.unet = UNet(3, unet_features, unet_depth).to(device)
    self.ae_unet = UNet(6, unet_features, unet_depth).to(device)
    self.frozen_ae = ConvAutoencoder(ae_features, latent_dim, s).to(device).eval().requires_grad_(False)
    self.opts = {name: torch.optim.Adam(getattr(self, name).parameters(), lr=1e-4)
                 for name in ('ae', 'unet', 'ae_unet')}
    g = torch.Generator().manual_seed(seed)
    self.images = torch.rand(b, 3, s, s, generator=g).to(device)
    self.masks = (torch.rand(b, 1, s, s, generator=g) > 0.9).float().to(device)

  def sync(self) -> None:
    if self.device.startswith('cuda'):
      torch.cuda.synchronize()

  def _step(self, name: str, loss_fn) -> float:
    opt = self.opts[name]
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    opt.step()
    return loss

  def ae_step(self):
    return self._step('ae', lambda: nn.functional.mse_loss(self.ae(self.images), self.images))

  def unet_step(self):
    return self._step('unet', lambda: nn.functional.binary_cross_entropy_with_logits(
        self.unet(self.images), self.masks))

  def ae_unet_step(self):
    def loss():
      with torch.no_grad():  # the frozen AE's difference image is part of the step
        diff = (self.images - self.frozen_ae(self.images)).abs()
      logits = self.ae_unet(torch.cat([self.images, diff], dim=1))
      return nn.functional.binary_cross_entropy_with_logits(logits, self.masks)
    return self._step('ae_unet', loss)

  @torch.inference_mode()
  def ae_unet_predict(self, images: torch.Tensor) -> torch.Tensor:
    diff = (images - self.frozen_ae(images)).abs()
    return torch.sigmoid(self.ae_unet(torch.cat([images, diff], dim=1)))
