"""Realistic, seeded input batches for the real-checkpoint benchmark (no data set needed).

Audio is synthetic voiced speech-like sound (a glottal-like harmonic series with vibrato and an
amplitude envelope, plus breath noise); images are smooth natural-looking fields in 0..255.
Each batch is what the package's own preprocessing would hand its network.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F

SR = 16000


def voiced(batch: int, samples: int, seed: int) -> torch.Tensor:
    """BATCH clips of voiced sound, f0 between 90 and 350 Hz, peak 0.5."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / SR
    f0 = 90 + 260 * torch.rand(batch, 1, generator=gen)
    phase = 2 * math.pi * torch.cumsum(f0 * (1 + 0.02 * torch.sin(2 * math.pi * 5 * t)), 1) / SR
    wave = sum(torch.sin(k * phase) / k for k in range(1, 16))
    envelope = 0.6 + 0.4 * torch.sin(2 * math.pi * 3 * t + torch.rand(batch, 1, generator=gen))
    wave = wave * envelope + 0.02 * torch.randn(batch, samples, generator=gen)
    return 0.5 * wave / wave.abs().amax(1, keepdim=True)


def mel(wave: torch.Tensor, n_fft: int, hop: int, n_mels: int, fmax: float, power: int) -> torch.Tensor:
    """(batch, frames, n_mels) mel spectrogram: HTK mel scale, librosa's default slaney area norm."""
    window = torch.hann_window(n_fft)
    spec = torch.stft(wave, n_fft, hop, window=window, return_complex=True).abs() ** power
    to_mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    points = torch.linspace(0, to_mel(fmax), n_mels + 2)
    hz = 700 * (10 ** (points / 2595) - 1)
    freqs = torch.linspace(0, SR / 2, n_fft // 2 + 1)
    lower, centre, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    bank = torch.clamp(torch.minimum(rising, falling), min=0) * 2 / (upper - lower)  # slaney area
    return (bank @ spec).transpose(1, 2)


def frames(wave: torch.Tensor, size: int, hop: int) -> torch.Tensor:
    """Overlapping frames of every clip, flattened to (n, size)."""
    return wave.unfold(1, size, hop).reshape(-1, size)


def images(batch: int, size: int, seed: int) -> torch.Tensor:
    """(batch, 3, size, size) smooth colour fields in 0..255 (low-frequency noise + gradient)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 6, generator=gen)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
    detail = 0.05 * torch.randn(batch, 3, size, size, generator=gen)
    return (255 * (0.7 * smooth + 0.3 * ramp + detail)).clamp(0, 255)


def crepe_frames() -> torch.Tensor:
    """16 frames of 1024 samples, each normalised to zero mean, unit std (torchcrepe.preprocess)."""
    x = frames(voiced(2, 8 * 1024, seed=1), 1024, 1024)
    x = x - x.mean(1, keepdim=True)
    return x / x.std(1, keepdim=True).clamp(min=1e-10)


def lpips_pair() -> tuple:
    """(reference, distorted) images in [-1, 1]: noise and a 2-pixel shift, as in a 2AFC pair."""
    ref = images(4, 64, seed=5) / 127.5 - 1
    gen = torch.Generator().manual_seed(6)
    distorted = torch.roll(ref, shifts=2, dims=3) + 0.1 * torch.randn(ref.shape, generator=gen)
    return ref, distorted.clamp(-1, 1)


def mtcnn(size: int, batch: int, seed: int) -> torch.Tensor:
    """Image crops normalised as facenet-pytorch does: (x - 127.5) * 0.0078125."""
    return (images(batch, size, seed) - 127.5) * 0.0078125


def build_all() -> dict:
    """Batch name → tensor or tuple of tensors."""
    wav_2s = voiced(2, 2 * SR, seed=2)
    return {
        "resemblyzer_mels": mel(0.2 * voiced(4, 25440, seed=0), 400, 160, 40, 8000, power=2),  # -30 dBFS
        "crepe_frames": crepe_frames(),
        "fcpe_mels": torch.log(mel(wav_2s, 1024, 160, 128, 8000, power=1).clamp(min=1e-5)),
        "pesto_audio": voiced(2, SR, seed=3),
        "silero_chunks": frames(voiced(1, 4 * 576, seed=4), 576, 576),
        "silero_jit_chunks": (frames(voiced(1, 4 * 512, seed=4), 512, 512), torch.tensor(SR)),
        "pnet_image": mtcnn(96, 2, seed=7)[..., :72],
        "rnet_crops": mtcnn(24, 16, seed=8),
        "onet_crops": mtcnn(48, 8, seed=9),
        "lpips_pair": lpips_pair(),
    }


def write_all(folder: Path) -> dict:
    """torch.save every batch under FOLDER; returns name → path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, batch in build_all().items():
        paths[name] = folder / f"{name}.pt"
        torch.save(batch, paths[name])
    return paths
