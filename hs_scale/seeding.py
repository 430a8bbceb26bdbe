"""Seeding of every RNG a run draws from (python, numpy, torch), shared by the trainer and the test harness."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
