"""What every model-file reader returns (`ModelFile`) and raises (`FormatError`).

A `ModelFile` is format-neutral: the model shape as a `ModelConfig` and the weights as one flat
float32 buffer in the `llmc.model.params` layout (padded vocabulary rows included), so a model read
from any format can be written to any other, loaded into CPUModel/GPUModel, or trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmc.config import ModelConfig
from llmc.model.params import num_params

FORMATS = ("hf", "llmc-bin", "llmc-ckpt")  # what load_model reports; save_model writes the first two


class FormatError(ValueError):
    """A model file that cannot be read or written; the message is one line: path, problem, fix."""


@dataclass
class ModelFile:
    config: ModelConfig
    params: np.ndarray  # float32 (N,) flat, llmc.model.params layout
    format: str  # "hf" | "llmc-bin" | "llmc-ckpt"
    path: Path  # the file or directory the weights were read from

    def __post_init__(self):
        n = num_params(self.config)
        if self.params.dtype != np.float32 or self.params.shape != (n,):
            raise ValueError(f"ModelFile.params must be float32 ({n},) for {self.config}, "
                             f"got {self.params.dtype} {self.params.shape}")
        if self.format not in FORMATS:
            raise ValueError(f"ModelFile.format must be one of {FORMATS}, got {self.format!r}")
        self.path = Path(self.path)
