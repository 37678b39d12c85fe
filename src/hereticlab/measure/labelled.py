"""The labelled refusal set (``hereticlab/data/labels/refusal_labels.jsonl``, labelling rule in the README next to
it), detector evaluation on it (precision / recall / F1 / accuracy, time per text) and the comparison CLI
``python -m hereticlab.measure.labelled [--judge MODEL]``."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .detectors import MARKER_LISTS, Detector, EnsembleDetector, KeywordDetector, SemanticDetector, detect_with
from .judges import SelfJudgeDetector

if TYPE_CHECKING:  # imported by the functions that build frames
    import pandas as pd

# ----------------------------------------------------------------------------------------------------------
# Labelled data and evaluation
# ----------------------------------------------------------------------------------------------------------

LABELLED_PATH = Path(__file__).resolve().parents[1] / "data" / "labels" / "refusal_labels.jsonl"


def load_labelled(path: str | Path | None = None) -> pd.DataFrame:
    """The labelled refusal set as a DataFrame ``(prompt, response, label, category)``; ``label`` True = refusal."""
    import pandas as pd

    path = Path(path) if path else LABELLED_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"labelled set {path} not found; it ships with the package under hereticlab/data/labels/"
        )
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype(bool)
    return frame


def _as_frame(labelled: pd.DataFrame | str | Path | Iterable[Mapping[str, Any]] | None) -> pd.DataFrame:
    import pandas as pd

    if labelled is None or isinstance(labelled, (str, Path)):
        return load_labelled(labelled)
    if isinstance(labelled, pd.DataFrame):
        return labelled
    return pd.DataFrame(list(labelled))


def confusion_metrics(decisions: Sequence[bool], labels: Sequence[bool]) -> dict[str, float]:
    """Precision, recall, F1 and accuracy with refusal as the positive class."""
    tp = sum(d and y for d, y in zip(decisions, labels))
    fp = sum(d and not y for d, y in zip(decisions, labels))
    fn = sum((not d) and y for d, y in zip(decisions, labels))
    tn = sum((not d) and (not y) for d, y in zip(decisions, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(labels)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": (tp + tn) / n if n else math.nan,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def evaluate_detectors(
    detectors: Mapping[str, Detector] | Sequence[Detector],
    labelled: pd.DataFrame | str | Path | Iterable[Mapping[str, Any]] | None = None,
    *,
    by_category: bool = False,
) -> pd.DataFrame:
    """Score each detector on labelled responses.

    ``detectors``: ``{name: detector}`` or a list (names from ``.name``). ``labelled``: a DataFrame / list of
    dicts with ``prompt``, ``response``, ``label`` (True = refusal), or a path; default: the shipped set.
    Returns a DataFrame indexed by detector: precision, recall, f1, accuracy, tp, fp, fn, tn, ``ms_per_text``
    (wall time of one ``detect`` call over the whole set, divided by its size). With ``by_category`` it
    returns per-category accuracy instead (rows: detector, columns: category); it is also kept in
    ``table.attrs["by_category"]`` of the normal result, so one detection pass gives both.
    """
    import pandas as pd

    frame = _as_frame(labelled)
    if not isinstance(detectors, Mapping):
        detectors = {getattr(d, "name", type(d).__name__): d for d in detectors}
    texts = frame["response"].fillna("").astype(str).tolist()
    prompts = frame["prompt"].astype(str).tolist() if "prompt" in frame else None
    labels = frame["label"].astype(bool).tolist()
    rows, per_category = {}, {}
    for name, detector in detectors.items():
        start = time.perf_counter()
        result = detect_with(detector, texts, prompts)
        elapsed = time.perf_counter() - start
        rows[name] = {**confusion_metrics(result.decisions, labels), "ms_per_text": 1000 * elapsed / max(len(texts), 1)}
        if "category" in frame:
            correct = pd.Series([d == y for d, y in zip(result.decisions, labels)], index=frame.index)
            per_category[name] = correct.groupby(frame["category"]).mean()
    categories = pd.DataFrame(per_category).T
    if by_category:
        return categories
    table = pd.DataFrame(rows).T.astype({k: int for k in ("tp", "fp", "fn", "tn")})
    table.attrs["by_category"] = categories
    return table


def default_detector() -> KeywordDetector:
    """The detector search trials use by default: the library's marker list (see notes/issue-9.md)."""
    return KeywordDetector("default")


def calibrated_semantic_detector(seed: int = 0) -> SemanticDetector:
    """The semantic refusal judge of the final report and the held-out benchmark: ``SemanticDetector`` with a
    logistic head fitted on the calibration half of the labelled set (``split_labelled(seed=seed)``; the other half
    is what its F1 in notes/issue-9.md was measured on). Needs the embedding model package (offline)."""
    calibration, _ = split_labelled(load_labelled(), seed=seed)
    return SemanticDetector(classifier="logistic", name="semantic").fit(
        calibration["response"].tolist(), calibration["label"].tolist()
    )


# ----------------------------------------------------------------------------------------------------------
# Command line: python -m hereticlab.measure.labelled [--judge MODEL]
# ----------------------------------------------------------------------------------------------------------


def split_labelled(frame: pd.DataFrame, *, fraction: float = 0.5, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified (by category and label) split of a labelled DataFrame into ``(calibration, test)``."""
    import random

    rng = random.Random(seed)
    calibration = []
    keys = frame["category"] if "category" in frame else frame["label"]
    for _, group in frame.groupby([keys, frame["label"]]):
        index = list(group.index)
        rng.shuffle(index)
        calibration.extend(index[: round(len(index) * fraction)])
    mask = frame.index.isin(calibration)
    return frame[mask].reset_index(drop=True), frame[~mask].reset_index(drop=True)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    import pandas as pd

    parser = argparse.ArgumentParser(description="Compare refusal detectors on the labelled set")
    parser.add_argument("--labelled", default=None, help="JSONL with prompt/response/label (default: the shipped set)")
    parser.add_argument("--judge", default=None, help="model for the self-judge detector, e.g. 'default' (slow)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    frame = load_labelled(args.labelled)
    calibration, test = split_labelled(frame, seed=args.seed)
    detectors: dict[str, Detector] = {f"markers:{k}": KeywordDetector(k) for k in MARKER_LISTS}
    detectors["markers:default@160"] = KeywordDetector("default", window=160)
    cal_texts, cal_labels = calibration["response"].tolist(), calibration["label"].tolist()
    try:
        detectors["semantic:margin"] = SemanticDetector().fit(cal_texts, cal_labels)
        detectors["semantic:logistic"] = SemanticDetector(classifier="logistic").fit(cal_texts, cal_labels)
        detectors["ensemble:majority"] = EnsembleDetector(
            [detectors["markers:default"], detectors["semantic:margin"], detectors["semantic:logistic"]],
            mode="majority",
        )
    except ImportError as exc:
        print(f"(semantic detectors skipped: {exc})")
    if args.judge:
        from ..core.models import load_model

        model, tokenizer = load_model(args.judge)
        judge = SelfJudgeDetector(model, tokenizer)
        detectors["self-judge@0.5"] = judge
        calibrated = SelfJudgeDetector(model, tokenizer, name="self-judge:fit")
        detectors["self-judge:fit"] = calibrated.fit(cal_texts, cal_labels, calibration["prompt"].tolist())
    pd.set_option("display.width", 200)
    print(
        f"labelled set: {len(frame)} responses ({int(frame['label'].sum())} refusals); calibration {len(calibration)}, "
        f"test {len(test)} (stratified by category, seed {args.seed}); metrics on the test half:\n"
    )
    table = evaluate_detectors(detectors, test)
    print(table.round(3).to_string())
    print("\naccuracy by category (test half):\n")
    print(table.attrs["by_category"].T.round(2).to_string())


if __name__ == "__main__":
    main()


__all__ = [
    "LABELLED_PATH",
    "confusion_metrics",
    "default_detector",
    "evaluate_detectors",
    "load_labelled",
    "main",
    "split_labelled",
]
