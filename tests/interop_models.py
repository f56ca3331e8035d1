"""diffusers models with random weights, for the interop tests (nothing is downloaded).

CIFAR10_CONFIG is google/ddpm-cifar10-32's config.json; DDPM_256_CONFIG is the google/ddpm-*-256
models' architecture. Both keep diffusers' field names so they go straight to UNet2DModel.
"""
import torch
from diffusers import UNet2DModel

CIFAR10_CONFIG = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None, "flip_sin_to_cos": False, "freq_shift": 1,
    "downsample_padding": 0, "norm_eps": 1e-6, "norm_num_groups": 32, "act_fn": "silu",
    "center_input_sample": False, "mid_block_scale_factor": 1, "dropout": 0.1,
}
DDPM_256_CONFIG = {
    **CIFAR10_CONFIG, "sample_size": 256, "dropout": 0.0,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
}


def narrow(config: dict, widths: tuple[int, ...], groups: int = 8) -> dict:
    """The same architecture at reduced width, to keep CPU tests fast."""
    return {**config, "block_out_channels": widths, "norm_num_groups": groups}


def random_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """A UNet2DModel whose every parameter is random: diffusers starts GroupNorms at (1, 0),
    which would hide a swapped norm weight/bias, so those are drawn too."""
    torch.manual_seed(seed)
    unet = UNet2DModel(**config)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
                module.bias.normal_(0.0, 0.05)
    return unet.eval()


def perturbed_unet(config: dict, seed: int) -> UNet2DModel:
    """A UNet2DModel with every parameter moved off its initial value (norms start at (1, 0),
    zero-initialised layers at 0: either would hide a swapped or missing weight)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(**config)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.5 * p.std().nan_to_num(0.1)))
    return unet.eval()


def use_our_timestep_embedding(monkeypatch):
    """diffusers computes the sinusoid's frequencies as (−log 10⁴ · k) / (half − shift), we as
    k · (−log 10⁴ / (half − shift)) (the original code's order): equal up to float32 rounding,
    ~3e-7 in the output, which a random-weight U-Net amplifies ~3× a step along a sampling
    chain. Chained comparisons hand diffusers our embedding (its forward is held to 1e-5 with
    its own elsewhere)."""
    from diffusers.models import embeddings

    from fastddpm.unet import timestep_embedding

    def ours(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
             max_period=10000):
        assert (scale, max_period) == (1, 10000)
        return timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos, downscale_freq_shift)

    monkeypatch.setattr(embeddings, "get_timestep_embedding", ours)
