r"""Evaluation tasks of the quality benchmark: data made or read here, and one metric per model.

Reporting sets and calibration sets are disjoint and fixed by seeds: nothing reported is used
to choose any setting of any method (the baselines' clip search looks at the weights only;
calibration data, for methods that take it, comes from :meth:`calibration`).

CREPE (pitch)
    One 1024-sample frame at 16 kHz per tone, f0 log-uniform in [50, 1000] Hz, four kinds
    (sine; harmonic: 2-8 harmonics with random decaying amplitudes and phases; band-limited
    sawtooth; band-limited square), half of them clean and half with white noise at an SNR
    drawn in [10, 30] dB. Frames are normalized as CREPE expects (zero mean, unit standard
    deviation). The 360 activations are decoded by the usual local weighted average: around
    the argmax bin :math:`m`, over bins :math:`i \in [m - 4, m + 4]` (clipped to the range),

    .. math:: \hat c = \frac{\sum_i a_i c_i}{\sum_i a_i}, \qquad
              c_i = 20 i + 1997.38\ \text{cents above 10 Hz},

    with no dither. Metrics: raw pitch accuracy (fraction of frames with
    :math:`|\hat c - c| \le 50` cents, :math:`c = 1200 \log_2(f_0 / 10)`) and the mean
    absolute error in cents.

MiniLM (sentence embeddings)
    Mean pooling of the last hidden state over the attention mask, then L2 normalization
    (what sentence-transformers does for all-MiniLM-L6-v2), on the sentences of
    ``sentences.txt`` (calibration: ``sentences_calibration.txt``). Metrics: the mean cosine
    similarity between compressed and dense embeddings of the same sentence, and the
    nearest-neighbour agreement (fraction of sentences whose most similar other sentence is
    the same under the compressed and the dense model).

ResNet-20 (CIFAR-10)
    Top-1 accuracy on the held-out 5,000 images, through the loader in ``benchmarks/cifar.py``.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from . import models as M

HERE = os.path.dirname(os.path.abspath(__file__))
TONE_KINDS = ("sine", "harmonic", "sawtooth", "square")
#: seeds of the tone sets; the reporting set and the calibration set never share a seed
REPORT_SEED = 20240
CALIBRATION_SEED = 777


# --------------------------------------------------------------------------------------
# CREPE
# --------------------------------------------------------------------------------------

def make_tones(n: int, seed: int):
    """``(frames (n, 1024) float32 normalized, f0 (n,) Hz, kinds, noisy)``; deterministic."""
    rng = np.random.default_rng(seed)
    t = np.arange(M.FRAME) / M.SAMPLE_RATE
    nyq = M.SAMPLE_RATE / 2
    frames = np.empty((n, M.FRAME), np.float64)
    f0 = np.exp(rng.uniform(math.log(50.0), math.log(1000.0), n))
    kinds = [TONE_KINDS[i % len(TONE_KINDS)] for i in range(n)]
    noisy = np.array([(i // len(TONE_KINDS)) % 2 == 1 for i in range(n)])
    for i in range(n):
        f, kind, phase = f0[i], kinds[i], rng.uniform(0, 2 * math.pi)
        if kind == "sine":
            x = np.sin(2 * math.pi * f * t + phase)
        elif kind == "harmonic":
            h = int(rng.integers(2, 9))
            amps = rng.uniform(0.3, 1.0, h) * (np.arange(1, h + 1) ** -rng.uniform(0.5, 1.5))
            x = sum(amps[k - 1] * np.sin(2 * math.pi * k * f * t + rng.uniform(0, 2 * math.pi))
                    for k in range(1, h + 1) if k * f < nyq)
        else:
            step = 2 if kind == "square" else 1
            ks = np.arange(1, int(nyq // f) + 1, step)
            x = (np.sin(2 * math.pi * np.outer(ks, f * t) + phase * ks[:, None])
                 / ks[:, None]).sum(0)
        x = x * rng.uniform(0.1, 1.0)
        if noisy[i]:
            snr_db = rng.uniform(10.0, 30.0)
            x = x + rng.normal(0.0, math.sqrt(np.mean(x ** 2) / 10 ** (snr_db / 10)), x.shape)
        x = x - x.mean()
        frames[i] = x / max(x.std(), 1e-10)
    return frames.astype(np.float32), f0, kinds, noisy


def decode_cents(act: torch.Tensor) -> torch.Tensor:
    """Local weighted average of the bin cents around the argmax (window +-4 bins)."""
    m = act.argmax(dim=1, keepdim=True)
    idx = torch.arange(act.shape[1], device=act.device)[None, :]
    win = (idx >= m - 4) & (idx <= m + 4)
    w = act * win
    cents = M.CENTS_BIN0 + M.CENTS_PER_BIN * idx.to(act.dtype)
    return (w * cents).sum(1) / w.sum(1).clamp_min(1e-12)


class CrepeTask:
    """Pitch of synthetic tones; ``metric`` = raw pitch accuracy (50 cents)."""

    metric = "rpa"
    metric_label = "raw pitch accuracy (50 cents)"
    higher_is_better = True

    def __init__(self, n_tones: int, batch: int = 64, n_calibration: int = 256):
        self.frames, self.f0, self.kinds, self.noisy = make_tones(n_tones, REPORT_SEED)
        self.true_cents = 1200.0 * np.log2(self.f0 / 10.0)
        self.batch = batch
        self.n_calibration = n_calibration

    def describe(self):
        return (f"{len(self.f0)} synthetic tones (1024 samples at 16 kHz, f0 50-1000 Hz "
                f"log-uniform; sine / harmonic / sawtooth / square; half with white noise at "
                f"10-30 dB SNR), seed {REPORT_SEED}")

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        x = torch.from_numpy(self.frames)
        pred = torch.cat([decode_cents(model(x[i:i + self.batch]))
                          for i in range(0, len(x), self.batch)]).double().numpy()
        err = np.abs(pred - self.true_cents)
        out = {"rpa": float(np.mean(err <= 50.0)), "cents_error": float(np.mean(err)),
               "rpa_clean": float(np.mean(err[~self.noisy] <= 50.0)),
               "rpa_noisy": float(np.mean(err[self.noisy] <= 50.0))}
        return out

    def calibration(self):
        """Batches of other tones (their own seed), for methods that take calibration data."""
        frames = make_tones(self.n_calibration, CALIBRATION_SEED)[0]
        x = torch.from_numpy(frames)
        return [x[i:i + self.batch] for i in range(0, len(x), self.batch)]


# --------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------

def read_sentences(name: str):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return [s.strip() for s in f if s.strip() and not s.startswith("#")]


class _MiniLMForward(torch.nn.Module):
    """Wraps the BERT encoder: ``forward(encoding) -> normalized mean-pooled embeddings``."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, enc):
        h = self.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      token_type_ids=enc.get("token_type_ids")).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(e, p=2, dim=1)


class MiniLMTask:
    """Sentence embeddings; ``metric`` = mean cosine to the dense embedding."""

    metric = "cosine"
    metric_label = "cosine to the dense embedding"
    higher_is_better = True

    def __init__(self, tokenizer, dense_model, n_sentences: int | None = None, batch: int = 64):
        self.sentences = read_sentences("sentences.txt")[:n_sentences]
        self.tokenizer = tokenizer
        self.batch = batch
        self.encodings = [self._encode(self.sentences[i:i + batch])
                          for i in range(0, len(self.sentences), batch)]
        self.reference = self.embed(dense_model)
        self.reference_nn = self._nn(self.reference)

    def _encode(self, sentences):
        return dict(self.tokenizer(sentences, padding=True, truncation=True, max_length=256,
                                   return_tensors="pt"))

    def describe(self):
        return (f"{len(self.sentences)} sentences of benchmarks/quality/sentences.txt "
                f"(mean pooling + L2 normalization)")

    @torch.no_grad()
    def embed(self, model):
        f = _MiniLMForward(model).eval()
        return torch.cat([f(enc) for enc in self.encodings])

    @staticmethod
    def _nn(e):
        s = e @ e.T
        s.fill_diagonal_(-math.inf)
        return s.argmax(1)

    def evaluate(self, model) -> dict:
        e = self.embed(model)
        cos = (e * self.reference).sum(1)
        return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
                "nn_agreement": float((self._nn(e) == self.reference_nn).double().mean())}

    def calibration(self):
        """Tokenized batches of ``sentences_calibration.txt`` (disjoint from the reported set)."""
        cal = read_sentences("sentences_calibration.txt")
        return [self._encode(cal[i:i + self.batch]) for i in range(0, len(cal), self.batch)]


# --------------------------------------------------------------------------------------
# ResNet-20 / CIFAR-10
# --------------------------------------------------------------------------------------

class CifarTask:
    """Top-1 accuracy on the held-out CIFAR-10 images of ``benchmarks/cifar.py``."""

    metric = "top1"
    metric_label = "top-1 accuracy (held-out 5,000 images)"
    higher_is_better = True

    def __init__(self, images, labels, calibration_fn=None, n_images: int | None = None,
                 batch: int = 500):
        self.images = images[:n_images]
        self.labels = labels[:n_images]
        self.batch = batch
        self._calibration_fn = calibration_fn

    def describe(self):
        return f"{len(self.labels)} held-out CIFAR-10 images (last 500 per class)"

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        hits = 0
        for i in range(0, len(self.labels), self.batch):
            hits += int((model(self.images[i:i + self.batch]).argmax(1)
                         == self.labels[i:i + self.batch]).sum())
        return {"top1": hits / len(self.labels)}

    def calibration(self):
        if self._calibration_fn is None:
            raise ValueError("CifarTask.calibration: benchmarks/cifar.py offers no training "
                             "batches for calibration")
        return self._calibration_fn()
