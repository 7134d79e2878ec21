"""Does speech survive tokenization? The judge transcribes held-out speech as it was, after
the codec (all codebooks, and the first alone) and after the unit vocoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slm.data.tokenizers import TokenizerSet
from slm.eval.judge import Judge, _split, corpus_rates, snap
from slm.speech.codec import log_spectral_distance


def resynthesis_report(judge: Judge, tokenizers: TokenizerSet, corpus_dir: str | Path,
                       split: str = "heldout", limit: int | None = None) -> dict:
    """Per path: the judge's CER/WER (snapped to the lexicon) and the mean log-spectral distance."""
    waves, texts = _split(corpus_dir, split, limit)
    rate = tokenizers.units.sample_rate
    paths = {"reference": lambda w: w,
             f"codec_q{tokenizers.codec.num_codebooks}": lambda w: tokenizers.codec.decode(
                 tokenizers.codec.encode(w, rate)),
             "codec_q1": lambda w: tokenizers.codec.decode(tokenizers.codec.encode(w, rate)[:1]),
             "unit_vocoder": lambda w: tokenizers.vocoder.decode(
                 tokenizers.units.centroids.assign(tokenizers.units.frames(w, rate)))}
    report = {"split": split, "utterances": len(texts)}
    for name, path in paths.items():
        outs = [path(w) for w in waves]
        cer, wer = corpus_rates([snap(h) for h in judge.transcribe_raw_batch(outs, rate)], texts)
        lsd = None if name == "reference" else float(np.mean(
            [log_spectral_distance(w, o, rate) for w, o in zip(waves, outs)]))
        report[name] = {"cer": cer, "wer": wer, "lsd_db": lsd}
    return report
