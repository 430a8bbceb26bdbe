"""Speech features: 80-dim log-mel filterbanks (kaldi-native-fbank), CMVN, SpecAugment.

Shapes: wav float32 [N] at 16 kHz in [-1, 1]; features float32 [T, 80] with T = 1 + (N - 400) // 160
(25 ms window, 10 ms shift, Kaldi's snip_edges).
"""

from __future__ import annotations

import json

import numpy as np

NUM_MEL_BINS = 80
SAMPLE_RATE = 16_000
_WIN, _HOP = 400, 160
_EPS = float(np.finfo(np.float32).eps)


def num_frames(num_samples: int) -> int:
    """Filterbank frames for a waveform of num_samples (matches kaldi-native-fbank with snip_edges=True)."""
    return 0 if num_samples < _WIN else 1 + (num_samples - _WIN) // _HOP


_OPTS = None


def _opts():
    global _OPTS
    if _OPTS is None:
        import kaldi_native_fbank as knf

        o = knf.FbankOptions()
        o.frame_opts.dither = 0.0  # deterministic features: resume and the precomputed path must agree exactly
        o.frame_opts.samp_freq = SAMPLE_RATE
        o.mel_opts.num_bins = NUM_MEL_BINS
        _OPTS = o
    return _OPTS


def fbank_reference(wav: np.ndarray) -> np.ndarray:
    """kaldi-native-fbank's own frame-by-frame computation: wav float32 [N] -> float32 [T, 80]."""
    import kaldi_native_fbank as knf

    f = knf.OnlineFbank(_opts())
    f.accept_waveform(SAMPLE_RATE, np.asarray(wav, dtype=np.float32) * 32768.0)
    f.input_finished()
    n = f.num_frames_ready
    if n == 0:
        return np.zeros((0, NUM_MEL_BINS), np.float32)
    return np.stack([f.get_frame(i) for i in range(n)]).astype(np.float32, copy=False)


_MEL = None
_WINDOW = None


def _mel_and_window():
    global _MEL, _WINDOW
    if _MEL is None:
        import kaldi_native_fbank as knf

        o = _opts()
        # [257, 80] triangular weights from the library itself (Kaldi mel scale, low_freq 20 Hz)
        _MEL = np.asarray(knf.MelBanks(o.mel_opts, o.frame_opts, 1.0).get_matrix(), np.float32).T.copy()
        n = np.arange(_WIN)
        _WINDOW = ((0.5 - 0.5 * np.cos(2 * np.pi * n / (_WIN - 1))) ** 0.85).astype(np.float32)  # "povey"
    return _MEL, _WINDOW


def fbank(wav: np.ndarray) -> np.ndarray:
    """wav float32 [N] in [-1, 1] -> log-mel float32 [T, 80] (Kaldi conventions: int16 sample scale).

    Same computation as kaldi-native-fbank's OnlineFbank (dither 0, DC removal, pre-emphasis 0.97, povey window,
    512-point power spectrum, the library's own mel matrix, log with eps floor), vectorized over frames in torch.
    NOTE: OnlineFbank goes one frame at a time (~12 us/frame), and numpy's OpenBLAS matmul spins threads that
    fight the DataLoader workers for the cores; torch with the worker's single thread is 3-5x faster than either,
    which the >= 300 utts/s per worker target needs. tests/data checks it against fbank_reference.
    """
    import torch

    t = num_frames(len(wav))
    if t == 0:
        return np.zeros((0, NUM_MEL_BINS), np.float32)
    mel, window = _mel_and_window()
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)) * 32768.0
    frames = x.unfold(0, _WIN, _HOP)[:t]                              # [T, 400]
    frames = frames - frames.mean(dim=1, keepdim=True)                # remove DC offset
    pre = torch.empty_like(frames)
    pre[:, 1:] = frames[:, 1:] - 0.97 * frames[:, :-1]                # pre-emphasis; Kaldi: x[0] -= 0.97 * x[0]
    pre[:, 0] = 0.03 * frames[:, 0]
    pre *= torch.from_numpy(window)
    spec = torch.fft.rfft(pre, n=512, dim=1)                          # [T, 257]
    power = spec.real.square() + spec.imag.square()
    return torch.log(torch.clamp(power @ torch.from_numpy(mel), min=_EPS)).numpy()


class CMVN:
    """Mean/variance normalization. Global stats (from the builder's `cmvn.json`) or per utterance.

    mode: "global" (needs stats), "utterance", or "none". The loader applies "utterance" itself; "global" is applied
    by the model (folded into its first convolution, hs_scale.models.s2t.Conv1dSubsampler, see `use_global_cmvn`),
    so the loader only uses these stats to fill SpecAugment masks.
    """

    def __init__(self, mode: str = "global", mean: np.ndarray | None = None, std: np.ndarray | None = None):
        if mode == "global" and (mean is None or std is None):
            raise ValueError("CMVN mode 'global' needs stats: build the corpus (writes cmvn.json) or use 'utterance'")
        self.mode = mode
        self.mean = None if mean is None else np.asarray(mean, np.float32)
        self.std = None if std is None else np.asarray(std, np.float32)
        self.inv_std = None if std is None else (1.0 / np.maximum(np.asarray(std, np.float32), 1e-5))

    @classmethod
    def from_corpus(cls, corpus_dir: str, mode: str) -> CMVN:
        """corpus_dir: a corpus location (path or URL, hs_scale.data.urls) holding cmvn.json."""
        from hs_scale.data import urls

        path = urls.join(corpus_dir, "cmvn.json")
        if mode == "global":
            try:
                s = json.loads(urls.read_bytes(path))
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{path} missing: CMVN 'global' needs the builder's stats; set cmvn: utterance") from None
            return cls("global", np.array(s["mean"]), np.array(s["std"]))
        return cls(mode)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x float32 [T, 80] -> float32 [T, 80]."""
        if self.mode == "none":
            return x
        if self.mode == "utterance":
            return (x - x.mean(0)) / np.maximum(x.std(0), 1e-5)
        return (x - self.mean) * self.inv_std


def use_global_cmvn(model, data_cfg) -> bool:
    """Give a speech model its corpus's global CMVN stats when ``data_cfg.cmvn`` is "global"; True if it did.

    With global CMVN the loader yields raw filterbanks and the model normalises them in its first convolution
    (hs_scale.models.s2t.Conv1dSubsampler says why), so every s2t model that reads the corpus (training,
    ``hs-scale evaluate``) needs this call after it is built. The stats are the corpus's cmvn.json (read again
    here, as the loader reads them). data_cfg: a DataConfig, or None (synthetic runs).
    """
    if data_cfg is None or data_cfg.modality != "speech" or data_cfg.cmvn != "global":
        return False
    conv = getattr(getattr(model, "encoder", None), "conv", None)
    if conv is None or not hasattr(conv, "set_global_cmvn"):
        raise ValueError(f"data.cmvn=global needs a speech model (model.arch=s2t), got {type(model).__name__}")
    stats = CMVN.from_corpus(data_cfg.corpus_dir, "global")
    conv.set_global_cmvn(stats.mean, stats.std)
    return True


class CMVNAccumulator:
    """Running sums for global CMVN stats (the builder feeds every train utterance)."""

    def __init__(self):
        self.n = 0
        self.s = np.zeros(NUM_MEL_BINS, np.float64)
        self.ss = np.zeros(NUM_MEL_BINS, np.float64)

    def add(self, x: np.ndarray) -> None:
        self.n += len(x)
        self.s += x.sum(0, dtype=np.float64)
        self.ss += (x.astype(np.float64) ** 2).sum(0)

    def merge(self, other: CMVNAccumulator) -> None:
        self.n, self.s, self.ss = self.n + other.n, self.s + other.s, self.ss + other.ss

    def to_json(self) -> dict:
        mean = self.s / max(self.n, 1)
        std = np.sqrt(np.maximum(self.ss / max(self.n, 1) - mean**2, 1e-10))
        return {"frames": int(self.n), "mean": mean.tolist(), "std": std.tolist()}


def spec_augment(
    x: np.ndarray, rng: np.random.Generator, freq_masks: int = 2, freq_width: int = 27, time_masks: int = 2,
    time_width: int = 40, max_time_ratio: float = 0.2, fill: np.ndarray | float = 0.0,
) -> np.ndarray:
    """SpecAugment (Park et al. 2019, LD-style masks without time warp) on features [T, 80].

    Masks are set to the normalised mean: 0 for features normalised already, the global mean ``fill`` [80] for raw
    features the model normalises (global CMVN). Drawn from `rng`, so a resumed run masks identically.
    """
    fill_F = np.broadcast_to(np.asarray(fill, np.float32), (x.shape[1],))
    x = x.copy()
    t, f = x.shape
    for _ in range(freq_masks):
        w = int(rng.integers(0, freq_width + 1))
        f0 = int(rng.integers(0, max(1, f - w)))
        x[:, f0 : f0 + w] = fill_F[f0 : f0 + w]
    tw = min(time_width, int(max_time_ratio * t))
    for _ in range(time_masks):
        w = int(rng.integers(0, tw + 1))
        t0 = int(rng.integers(0, max(1, t - w)))
        x[t0 : t0 + w, :] = fill_F
    return x
