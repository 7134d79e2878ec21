"""Pictures people would rather see than read: a spoken reply over its token streams, and the
strategy ablation's loss curves and accuracy-latency trade."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slm.vocab import Vocab


def reply_figure(path: str | Path, wave: np.ndarray | None, sample_rate: int, tokens_kt: np.ndarray,
                 stream_names: list[str], vocab: Vocab, title: str) -> None:
    """Spectrogram of the spoken reply above the reply's token streams (kind of token per step)."""
    import librosa
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), gridspec_kw={"height_ratios": [2, 1]})
    if wave is not None and wave.size:
        mel = librosa.feature.melspectrogram(y=wave, sr=sample_rate, n_mels=80, hop_length=160)
        top.imshow(librosa.power_to_db(mel, ref=np.max), origin="lower", aspect="auto",
                   extent=[0, wave.size / sample_rate, 0, 80], cmap="magma")
        top.set_xlabel("seconds")
        top.set_ylabel("mel bin")
    top.set_title(title)
    kinds = ["special", "text", "units", "acoustic", "reserved"]
    codes = np.vectorize(lambda t: kinds.index(vocab.range_of(int(t)).kind))(tokens_kt)
    bottom.imshow(codes, aspect="auto", interpolation="nearest", cmap="tab10", vmin=0, vmax=9)
    bottom.set_yticks(range(len(stream_names)), stream_names)
    bottom.set_xlabel("reply step")
    for k in range(tokens_kt.shape[0]):
        for t in range(tokens_kt.shape[1]):
            if tokens_kt.shape[1] <= 40:
                bottom.text(t, k, vocab.to_string(int(tokens_kt[k, t])), fontsize=5, ha="center",
                            va="center", rotation=90)
    handles = [plt.Rectangle((0, 0), 1, 1, color=plt.cm.tab10(i)) for i in range(4)]
    bottom.legend(handles, kinds[:4], loc="upper right", fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ablation_figures(out: str | Path, report: dict, histories: dict[str, list[dict]]) -> None:
    """`loss_curves.png` (training and held-out dialogue loss per strategy) and
    `accuracy_vs_latency.png` (answer accuracy against steps to first audio: the trade the
    strategies make)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    loss_figure(plt, out / "loss_curves.png", histories, "Loss, same data, model and steps",
                tasks=("dialogue",))
    fig, ax = plt.subplots(figsize=(6, 4))
    labelled: dict[tuple, int] = {}  # strategies on the same point get their labels stacked
    for name, result in report["strategies"].items():
        latency = result.get("steps_to_first_audio") or 0
        point = (latency, result["answer_accuracy"])
        ax.scatter(*point, s=60, label=name)
        if result.get("spoken_accuracy") is not None:
            ax.scatter(latency, result["spoken_accuracy"], s=60, marker="x", color="gray")
        below = labelled[point] = labelled.get(point, -1) + 1
        ax.annotate(name, point, textcoords="offset points", xytext=(6, 5 - 11 * below),
                    fontsize=8)
    ax.set(xlabel="reply steps to first audio (median)", ylabel="held-out accuracy",
           ylim=(-0.05, 1.05), title="Accuracy (dot: text, x: heard by the judge) vs latency")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_latency.png", dpi=120)
    plt.close(fig)
    _accuracy_by_condition(plt, out / "accuracy_by_condition.png", report)


def run_loss_figure(path: str | Path, history: list[dict], name: str) -> None:
    """One run's training loss and the held-out loss of each of its tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_figure(plt, Path(path), {name: history}, f"{name}: training vs held-out loss")


def loss_figure(plt, path: Path, histories: dict[str, list[dict]], title: str,
                tasks: tuple[str, ...] | None = None) -> None:
    """Training loss (smoothed, solid) per run and its held-out loss (dashed, `eval/<task>/loss`
    of `tasks`, every task when None): where they part, the model memorizes."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, history) in enumerate(histories.items()):
        color = f"C{i}"
        steps = np.array([h["step"] for h in history])
        loss = np.array([h["loss"] for h in history])
        window = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color=color, label=f"{name}: training")
        held = sorted({k.split("/")[1] for h in history for k in h
                       if k.startswith("eval/") and k.endswith("/loss") and k.count("/") == 2})
        for j, task in enumerate(t for t in held if tasks is None or t in tasks):
            points = [(h["step"], h[f"eval/{task}/loss"]) for h in history if f"eval/{task}/loss" in h]
            ax.plot(*zip(*points), color=color if tasks else f"C{i + j + 1}", linestyle="--",
                    marker=".", label=f"{name}: held-out {task}")
    ax.set(xlabel="step", ylabel="loss (per weighted token)", yscale="log", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _accuracy_by_condition(plt, path: Path, report: dict) -> None:
    """Per condition, each strategy's accuracy with its 95% interval: heard by the judge for
    spoken questions, the text channel for written ones; the controls' chance as a bar."""
    from slm.eval.spoken_qa import TEXT_CONDITIONS as written

    strategies, conditions = report["strategies"], report["conditions"]
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(conditions)), 4))
    width = 0.8 / max(len(strategies), 1)
    x = np.arange(len(conditions))
    for i, (name, result) in enumerate(strategies.items()):
        empty = {"accuracy": np.nan, "low": np.nan, "high": np.nan}  # a condition it cannot take
        channel = lambda c: "answer" if c in written else "spoken"  # noqa: E731
        stats = [result["conditions"].get(c, {}).get(channel(c)) or empty for c in conditions]
        acc = np.array([s["accuracy"] for s in stats])
        err = np.maximum(0.0, [[a - s["low"] for a, s in zip(acc, stats)],
                               [s["high"] - a for a, s in zip(acc, stats)]])
        ax.errorbar(x + (i - (len(strategies) - 1) / 2) * width, acc, yerr=err, fmt="o",
                    capsize=2, label=name)
    chance = [next(r["conditions"][c]["chance"]["majority"] for r in strategies.values()
                   if c in r["conditions"]) for c in conditions]
    ax.bar(x, chance, 0.9, color="lightgray", zorder=0, label="chance (majority answer)")
    ax.set_xticks(x, conditions, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="accuracy (95% interval)", ylim=(-0.02, 1.02),
           title="Held-out accuracy per condition (spoken questions: as heard by the judge)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
