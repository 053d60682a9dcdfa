"""PyTorch references of semiseg's U-Net and autoencoder, written the ordinary PyTorch way (NCHW).

Same layers, widths, paddings and parameter counts as ``semiseg.models`` (the U-Net has 31,033,473
parameters at 6 -> 1 channels, 64 features, depth 4), with ``nn.ConvTranspose2d`` for the up-convs,
``nn.MaxPool2d`` for pooling and ``torch.optim.Adam``; only for timing, never imported by the library.
``TrainSteps`` runs the same networks and optimizer as the plain fp32 NCHW eager path, or with
channels_last, bf16 autocast and ``torch.compile``, which users who care about speed run.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from semiseg.models.autoencoder import NORMALIZE_EPS
from semiseg.models.unet import group_count


class DoubleConv(nn.Sequential):
  """Two padded 3x3 convs with ReLUs; ``norm='group'``: a GroupNorm (8 channels a group) before each ReLU."""

  def __init__(self, cin: int, cout: int, norm: str = 'none'):
    layers = []
    for c in (cin, cout):
      layers.append(nn.Conv2d(c, cout, 3, padding=1))
      if norm == 'group':
        layers.append(nn.GroupNorm(group_count(cout), cout, eps=1e-6))  # Flax's GroupNorm eps
      layers.append(nn.ReLU(inplace=True))
    super().__init__(*layers)


class UNet(nn.Module):
  """Ronneberger's U-Net with padded convs, as ``semiseg.models.unet.UNet``."""

  def __init__(self, in_channels: int = 6, features: int = 64, depth: int = 4, num_outputs: int = 1,
               norm: str = 'none'):
    super().__init__()
    widths = [features * 2 ** level for level in range(depth + 1)]
    self.down = nn.ModuleList(DoubleConv(cin, cout, norm)
                              for cin, cout in zip([in_channels] + widths[:-2], widths[:-1]))
    self.pool = nn.MaxPool2d(2)
    self.bottom = DoubleConv(widths[-2], widths[-1], norm)
    self.upconv = nn.ModuleList(nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
                                for level in range(depth))
    self.up = nn.ModuleList(DoubleConv(2 * widths[level], widths[level], norm) for level in range(depth))
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
  """Strided-conv encoder -> code -> mirrored decoder, as ``semiseg.models.autoencoder``: the paper's
  dense code (``bottleneck='dense'``: Linear to ``latent_dim`` and back) or a spatial one (``'conv'``:
  1x1 convolutions to ``latent_dim`` channels at the bottom resolution and back); ``normalize='image'``
  standardizes each image per channel, (x - mean) / (std + 0.02), and maps the linear head's output
  back (no sigmoid), as semiseg's ``config.model.ae_normalize``."""

  def __init__(self, features: Sequence[int] = (32, 64, 128, 256, 256), latent_dim: int = 500,
               image_size: int = 256, channels: int = 3, bottleneck: str = 'dense', normalize: str = 'none'):
    super().__init__()
    if bottleneck not in ('dense', 'conv') or normalize not in ('none', 'image'):
      raise ValueError(f'unknown AE bottleneck {bottleneck!r} or normalize {normalize!r}')
    self.bottleneck, self.normalize = bottleneck, normalize
    act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
    layers, cin = [], channels
    for f in features:
      layers += [nn.Conv2d(cin, f, 4, stride=2, padding=1), act(), nn.Conv2d(f, f, 3, padding=1), act()]
      cin = f
    self.encoder = nn.Sequential(*layers)
    self.bottom = (features[-1], image_size // 2 ** len(features), image_size // 2 ** len(features))
    size = self.bottom[0] * self.bottom[1] * self.bottom[2]
    if bottleneck == 'dense':
      self.to_latent = nn.Linear(size, latent_dim)
      self.from_latent = nn.Sequential(nn.Linear(latent_dim, size), act())
    else:
      self.to_latent = nn.Conv2d(features[-1], latent_dim, 1)
      self.from_latent = nn.Sequential(nn.Conv2d(latent_dim, features[-1], 1), act())
    layers = []
    for f in list(reversed(features))[1:] + [features[0]]:
      layers += [nn.ConvTranspose2d(cin, f, 4, stride=2, padding=1), act(), nn.Conv2d(f, f, 3, padding=1), act()]
      cin = f
    layers.append(nn.Conv2d(cin, channels, 3, padding=1))
    if normalize == 'none':
      layers.append(nn.Sigmoid())
    self.decoder = nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.normalize == 'image':
      mean = x.mean(dim=(2, 3), keepdim=True)
      scale = x.std(dim=(2, 3), keepdim=True, unbiased=False) + NORMALIZE_EPS
      x = (x - mean) / scale
    h = self.encoder(x)
    if self.bottleneck == 'dense':
      h = self.from_latent(self.to_latent(h.flatten(1))).view(-1, *self.bottom)
    else:
      h = self.from_latent(self.to_latent(h))
    out = self.decoder(h)
    return mean + scale * out if self.normalize == 'image' else out


def count_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


class TrainSteps:
  """Adam train steps and inference of the three workloads on one set of shapes (NCHW tensors).

  ``channels_last``: networks and inputs in that memory format; ``bf16``: forward passes under bf16
  autocast (parameters, loss and Adam state stay float32, as semiseg's ``config.model.dtype='bfloat16'``);
  ``compile``: the networks through ``torch.compile`` (default mode; it compiles on the first call);
  ``cudnn_benchmark``: cuDNN picks its fastest convolution algorithms for these shapes (GPU; PyTorch's
  default is off). A network is built on first use, so an instance holds only the networks it runs.
  """

  def __init__(self, *, image_size: int, batch_size: int, unet_features: int, unet_depth: int,
               unet_norm: str = 'none', ae_bottleneck: str = 'dense', ae_normalize: str = 'none',
               ae_features: Sequence[int], latent_dim: int, device: str = 'cpu', channels_last: bool = False,
               bf16: bool = False, compile: bool = False, cudnn_benchmark: bool = False,  # noqa: A002
               seed: int = 0):
    self.device, self.seed = device, seed
    self.channels_last, self.bf16, self.compile = channels_last, bf16, compile
    self.cudnn_benchmark = cudnn_benchmark
    s = image_size
    ae = lambda: ConvAutoencoder(ae_features, latent_dim, s, bottleneck=ae_bottleneck,  # noqa: E731
                                 normalize=ae_normalize)
    self._build = {'ae': ae,
                   'frozen_ae': lambda: ae().eval().requires_grad_(False),
                   'unet': lambda: UNet(3, unet_features, unet_depth, norm=unet_norm),
                   'ae_unet': lambda: UNet(6, unet_features, unet_depth, norm=unet_norm)}
    self._nets: dict[str, nn.Module] = {}
    self.opts: dict[str, torch.optim.Optimizer] = {}
    g = torch.Generator().manual_seed(seed)
    self.images = self.as_input(torch.rand(batch_size, 3, s, s, generator=g))
    self.masks = self.as_input((torch.rand(batch_size, 1, s, s, generator=g) > 0.9).float())

  def as_input(self, x: torch.Tensor) -> torch.Tensor:
    x = x.to(self.device)
    return x.to(memory_format=torch.channels_last) if self.channels_last else x

  def net(self, name: str) -> nn.Module:
    """The network ``name`` (ae, frozen_ae, unet, ae_unet) as it runs (compiled: the wrapper)."""
    if name not in self._nets:
      torch.manual_seed(self.seed)
      module = self._build[name]().to(self.device)
      if self.channels_last:
        module = module.to(memory_format=torch.channels_last)
      if name != 'frozen_ae':
        self.opts[name] = torch.optim.Adam(module.parameters(), lr=1e-4)
      self._nets[name] = torch.compile(module) if self.compile else module
    return self._nets[name]

  def autocast(self):
    """bf16 autocast of forward passes (PyTorch's advice: not around the backward pass)."""
    return torch.autocast(device_type=self.device.split(':')[0], dtype=torch.bfloat16, enabled=self.bf16)

  def cudnn(self):
    """The cuDNN benchmark setting, a global flag: set around every call, backward included."""
    c = torch.backends.cudnn
    return c.flags(enabled=c.enabled, benchmark=self.cudnn_benchmark, deterministic=c.deterministic,
                   allow_tf32=c.allow_tf32)

  def sync(self) -> None:
    if self.device.startswith('cuda'):
      torch.cuda.synchronize()

  def _step(self, name: str, loss_fn) -> torch.Tensor:
    net = self.net(name)
    opt = self.opts[name]
    with self.cudnn():
      opt.zero_grad(set_to_none=True)
      with self.autocast():
        loss = loss_fn(net)
      loss.backward()
      opt.step()
    return loss

  def ae_step(self):
    return self._step('ae', lambda ae: nn.functional.mse_loss(ae(self.images).float(), self.images))

  def unet_step(self):
    return self._step('unet', lambda unet: nn.functional.binary_cross_entropy_with_logits(
        unet(self.images).float(), self.masks))

  def ae_unet_step(self):
    frozen_ae = self.net('frozen_ae')

    def loss(unet):
      with torch.no_grad():  # the frozen AE's difference image is part of the step
        diff = (self.images - frozen_ae(self.images)).abs()
      logits = unet(torch.cat([self.images, diff.to(self.images.dtype)], dim=1))
      return nn.functional.binary_cross_entropy_with_logits(logits.float(), self.masks)
    return self._step('ae_unet', loss)

  @torch.inference_mode()
  def ae_unet_predict(self, images: torch.Tensor) -> torch.Tensor:
    with self.cudnn(), self.autocast():
      diff = (images - self.net('frozen_ae')(images)).abs()
      return torch.sigmoid(self.net('ae_unet')(torch.cat([images, diff.to(images.dtype)], dim=1)).float())
