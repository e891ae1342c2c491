"""Default locations of every stage's inputs and outputs (relative to the project root).

``dvc.yaml``, the CLI defaults and the Prefect flow all use this layout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    def __truediv__(self, other: str) -> Path:
        return self.root / other

    def rooted(self, path: str) -> str:
        """A path ``params.yaml`` names (a corpus file, a held-out text, a glob), as the stages
        read it: relative to the project folder, not to the directory the command runs in
        (``lmcore --root``); an absolute path is kept."""
        return path if Path(path).is_absolute() else str(self.root / path)

    @property
    def raw(self) -> Path:
        return self / "data/raw"

    @property
    def tasks(self) -> Path:
        return self / "data/raw/tasks"

    @property
    def clean(self) -> Path:
        return self / "data/clean"

    @property
    def tokenizer(self) -> Path:
        return self / "data/tokenizer"

    @property
    def tokens(self) -> Path:
        return self / "data/tokens"

    @property
    def pretrain(self) -> Path:
        return self / "runs/pretrain"

    @property
    def pretrained(self) -> Path:
        return self / "runs/pretrain/final"

    @property
    def export(self) -> Path:
        return self / "runs/export"

    @property
    def finetune(self) -> Path:
        return self / "runs/finetune"

    @property
    def evaluate(self) -> Path:
        return self / "runs/evaluate"

    def metrics(self, stage: str) -> Path:
        return self / f"metrics/{stage}.json"

    @property
    def plots(self) -> Path:
        """Pretraining's history for ``dvc plots``: pretrain_train.csv, pretrain_val.csv."""
        return self / "metrics/plots"
