"""Factories for the audio checkpoints: each returns the shipping package's own model class.

Used as ``gradcheck inspect WEIGHTS --model bench/real_models/audio.py:FACTORY`` with the
benchmark's target directory and this folder on PYTHONPATH (bench/real_checkpoints.py sets both).
"""

import torch
import torch.nn.functional as F
from _bare import bare_package, import_bare, stub
from torch import nn


def voice_encoder() -> nn.Module:
    """resemblyzer's LSTM speaker encoder (3×LSTM(40→256) + Linear(256→256), L2-normalised)."""
    stub("resemblyzer.audio")  # librosa/webrtcvad preprocessing, not used by the network
    encoder = import_bare("resemblyzer.voice_encoder")
    return encoder.VoiceEncoder(device="cpu", verbose=False)


def voice_encoder_ge2e() -> nn.Module:
    """The same encoder with the GE2E loss's two scalars, as the training run saved it."""
    model = voice_encoder()
    model.similarity_weight = nn.Parameter(torch.tensor([10.0]))
    model.similarity_bias = nn.Parameter(torch.tensor([-5.0]))
    return model


def _crepe(capacity: str) -> nn.Module:
    bare_package("torchcrepe").PITCH_BINS = 360  # set by torchcrepe/core.py, which needs librosa
    return import_bare("torchcrepe.model").Crepe(capacity)


def crepe_tiny() -> nn.Module:
    """torchcrepe 'tiny': 6 conv+BN+maxpool blocks on 1024-sample frames, 360 pitch bins."""
    return _crepe("tiny")


def crepe_full() -> nn.Module:
    """torchcrepe 'full' (22 M parameters)."""
    return _crepe("full")


def fcpe() -> nn.Module:
    """torchfcpe's CFNaiveMelPE with the config stored in fcpe_c_v001.pt (conv-only conformer)."""
    stub("local_attention", LocalAttention=None)  # only built when conv_only=False
    models = import_bare("torchfcpe.models")
    return models.CFNaiveMelPE(
        input_channels=128,
        out_dims=360,
        hidden_dims=512,
        n_layers=6,
        n_heads=8,
        f0_max=1975.5,
        f0_min=32.7,
        use_fa_norm=True,
        conv_only=True,
    )


def _pesto(encoder_kwargs: dict, hcqt_kwargs: dict) -> nn.Module:
    model_mod = import_bare("pesto.model")
    data = import_bare("pesto.data")

    class Pesto16k(model_mod.PESTO):
        """PESTO on 16 kHz audio; its HCQT kernels are built lazily on the first forward."""

        def forward(self, audio: torch.Tensor):
            return super().forward(audio, sr=16000)

    preprocessor = data.Preprocessor(hop_size=10.0, sampling_rate=None, **hcqt_kwargs)
    encoder = model_mod.Resnet1d(**encoder_kwargs)
    shift = {"min_steps": -16, "max_steps": 16}
    return Pesto16k(encoder, preprocessor=preprocessor, crop_kwargs=shift, reduction="alwa")


def pesto_mir1k_g7() -> nn.Module:
    """PESTO (pesto-pitch) mir-1k_g7: the hparams stored in the checkpoint."""
    # gradcheck runs only a factory file's definitions, so the constants live in here
    encoder = dict(n_chan_input=1, n_chan_layers=[40, 30, 30, 10, 3], residual=True, output_dim=384)
    encoder.update(activation_fn="leaky", a_lrelu=0.3, p_dropout=0.2, fc_margin=0, spiral=0)
    encoder.update(n_prefilt_layers=3, prefilt_kernel_size=39, n_bins_in=219, final_norm="softmax")
    hcqt = dict(harmonics=[1], fmin=27.5, fmax=None, bins_per_semitone=3, n_bins=251)
    return _pesto(encoder, dict(hcqt, center_bins=True, gamma=7, center=True))


class SileroVAD16k(nn.Module):
    """torch port of silero_vad/tinygrad_model.py, the architecture of silero_vad_16k.safetensors."""

    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
        self.stft_conv.weight.requires_grad_(False)  # a fixed STFT basis (a buffer in the JIT)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stft_conv(F.pad(x, (0, 64), mode="reflect").unsqueeze(1))
        x = (x[:, :129, :] ** 2 + x[:, 129:, :] ** 2).sqrt()
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = conv(x).relu()
        h, _ = self.lstm_cell(x.squeeze(-1))
        return self.final_conv(h.unsqueeze(-1).relu()).sigmoid().squeeze(1).mean(dim=1, keepdim=True)


def silero_vad_16k() -> nn.Module:
    return SileroVAD16k()
