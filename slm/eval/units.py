"""How phonetic are the units? Frame purity and PNMI against espeak's phoneme timings.

Purity: how often a unit's frames carry its most common phoneme. PNMI (phone-normalized mutual
information, as in the HuBERT paper): the share of phoneme entropy the units explain. Both are
measured on held-out voices, since units that only work for training speakers are useless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slm.data.corpus import load_manifest
from slm.data.tokenizers import TokenizerSet
from slm.speech.audio import load_audio
from slm.speech.units import unit_purity


def frame_labels(phonemes: list, num_frames: int, frame_rate: float) -> np.ndarray:
    """Phoneme label of each frame centre, or "" where no phoneme is sounding."""
    centres = (np.arange(num_frames) + 0.5) / frame_rate
    labels = np.full(num_frames, "", dtype=object)
    for label, start, end in phonemes:
        labels[(centres >= start) & (centres < end)] = label
    return labels


def phoneme_purity(corpus_dir: str | Path, tokenizers_dir: str | Path, split: str = "heldout",
                   limit: int | None = None) -> dict:
    """Frame-level purity and PNMI of the units over a corpus split's labelled frames."""
    corpus_dir = Path(corpus_dir)
    units_tok = TokenizerSet.load(tokenizers_dir).units
    all_units, all_labels = [], []
    for utt in load_manifest(corpus_dir / split / "utterances.jsonl")[:limit]:
        wave = load_audio(corpus_dir / utt["audio"], units_tok.sample_rate)
        units = units_tok.centroids.assign(units_tok.frames(wave, units_tok.sample_rate))
        labels = frame_labels(utt["phonemes"], len(units), units_tok.frame_rate)
        voiced = labels != ""
        all_units.append(units[voiced])
        all_labels.append(labels[voiced])
    units, labels = np.concatenate(all_units), np.concatenate(all_labels)
    _, label_ids = np.unique(labels.astype(str), return_inverse=True)
    purity, pnmi = unit_purity(units, label_ids)
    return {"split": split, "frames": int(units.size), "phonemes": int(label_ids.max() + 1),
            "units": units_tok.num_units, "purity": float(purity), "pnmi": float(pnmi)}
