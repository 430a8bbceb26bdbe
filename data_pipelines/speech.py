"""Speech synthesis with espeak-ng, in-process through ctypes, plus cheap acoustic conditions.

No real multilingual speech can be downloaded offline, so the corpus speech is synthesized. espeak-ng is loaded
from the `espeakng-loader` wheel (bundles libespeak-ng 1.52 and its voice data) or, failing that, the system
library (Debian package `libespeak-ng1` + `espeak-ng-data`).

NOTE: libespeak-ng keeps global state (one voice, one callback per process), so a `Synthesizer` is a per-process
singleton; parallel builds use one process per core, each with its own library instance.

Shapes: waveforms are float32 numpy arrays [N] in [-1, 1] at 16 kHz.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000
_ESPEAK_RATE = 22_050  # espeak-ng's native rate; 16000/22050 = 320/441

# espeak-ng voice names for the corpus languages (ISO 639-1 -> espeak voice).
VOICES = {
    "de": "de", "fr": "fr", "es": "es", "it": "it", "pt": "pt", "ru": "ru", "el": "el", "ar": "ar",
    "en": "en", "nl": "nl", "pl": "pl", "sv": "sv", "tr": "tr", "cs": "cs", "fi": "fi",
}
# Voice variants (files under espeak-ng-data/voices/!v): a random one per utterance gives speaker variety.
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]
CONDITIONS = ("clean", "noisy", "fast")

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _find_library() -> tuple[str, str | None]:
    """Path of libespeak-ng and its data dir: the pip wheel first, then the system library."""
    try:
        import espeakng_loader

        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except ImportError:
        pass
    lib = ctypes.util.find_library("espeak-ng")
    if lib is None:
        raise RuntimeError(
            "espeak-ng not found: `pip install espeakng-loader` (bundles the library), "
            "or `apt-get install libespeak-ng1 espeak-ng-data`"
        )
    return lib, None


class Synthesizer:
    """Per-process espeak-ng instance. `synth(text, lang, variant, rate, pitch)` -> float32 [N] at 16 kHz."""

    _instance: Synthesizer | None = None

    @classmethod
    def get(cls) -> Synthesizer:
        # Re-create after fork: the library's state must not be shared across processes.
        if cls._instance is None or cls._instance._pid != os.getpid():
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        lib_path, data_path = _find_library()
        self._lib = ctypes.CDLL(lib_path)
        self._pid = os.getpid()
        rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode() if data_path else None, 0
        )
        if rate != _ESPEAK_RATE:
            raise RuntimeError(f"espeak_Initialize returned {rate}, expected {_ESPEAK_RATE} Hz")
        self._chunks: list[np.ndarray] = []

        def _cb(wav, n, _events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0  # 0 = continue synthesis

        self._cb = _CALLBACK(_cb)  # keep a reference: ctypes callbacks die with their Python object
        self._lib.espeak_SetSynthCallback(self._cb)
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        self._voice = None

    def synth(self, text: str, lang: str, variant: str = "m1", rate: int = 175, pitch: int = 50) -> np.ndarray:
        """Synthesize `text` -> float32 [N] at 16 kHz. rate: words/min (80-450), pitch 0-100."""
        voice = f"{VOICES.get(lang, lang)}+{variant}"
        if voice != self._voice:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self._voice = voice
        self._lib.espeak_SetParameter(_RATE, int(rate), 0)
        self._lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        err = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with code {err} for {text!r}")
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        wav = pcm.astype(np.float32) / 32768.0
        return resample_poly(wav, 320, 441).astype(np.float32)


def apply_condition(wav: np.ndarray, condition: str, rng: np.random.Generator) -> np.ndarray:
    """Acoustic condition usable as a domain: clean, noisy (white noise at 10-20 dB SNR), fast (tempo 1.3).

    wav: float32 [N] -> float32 [N'] (N' ~ N/1.3 for fast).
    """
    if condition == "clean":
        return wav
    if condition == "noisy":
        power = float(np.mean(wav**2)) + 1e-10
        snr_db = rng.uniform(10.0, 20.0)
        noise = rng.standard_normal(len(wav)).astype(np.float32) * np.sqrt(power / 10 ** (snr_db / 10))
        return np.clip(wav + noise, -1.0, 1.0).astype(np.float32)
    if condition == "fast":
        # Resampling by 10/13 then playing at 16 kHz = tempo (and pitch) x1.3; cheap and deterministic.
        return resample_poly(wav, 10, 13).astype(np.float32)
    raise ValueError(f"unknown acoustic condition {condition!r}; use one of {CONDITIONS}")


def synthesize_utterance(
    text: str, lang: str, rng: np.random.Generator, condition: str = "clean"
) -> tuple[np.ndarray, dict]:
    """One utterance with a random voice variant, rate and pitch. Returns (wav float32 [N], voice metadata)."""
    meta = {
        "variant": VARIANTS[int(rng.integers(len(VARIANTS)))],
        "rate": int(rng.integers(140, 211)),
        "pitch": int(rng.integers(30, 71)),
        "condition": condition,
    }
    wav = Synthesizer.get().synth(text, lang, meta["variant"], meta["rate"], meta["pitch"])
    return apply_condition(wav, condition, rng), meta
