"""Benchmark results as text: the ablation's `results.md`, and the README's block of it.

The README's numbers are never typed by hand: `slm results --ablation DIR` rewrites the block
between `README_BEGIN` and `README_END` from `DIR/results.json`.
"""

from __future__ import annotations

import re
from pathlib import Path

from slm import atomic
from slm.errors import DataError
from slm.eval.spoken_qa import CONTROLS, PERTURBED, SPOKEN_SETS, TEXT_CONDITIONS
from slm.eval.stats import wilson

HEADLINE = ("answer_accuracy", "spoken_accuracy", "speech_cer", "steps_to_first_audio",
            "ms_to_first_audio", "decode_tokens_per_s", "train_tokens_per_s", "final_loss", "params")


def interval(result: dict | None) -> str:
    """An accuracy and its 95% interval, as every table prints them; "-" for none."""
    if not result:
        return "-"
    return f"{result['accuracy']:.2f} [{result['low']:.2f}, {result['high']:.2f}]"


def run_cost(report: dict) -> str:
    """One sentence on what the ablation itself cost: wall minutes, where, and how busy."""
    run = report.get("run")
    if not run:
        return "The ablation's wall time was not recorded (results from before it was)."
    if run.get("resumed"):
        return ("This report was rendered by an invocation that reused stages an earlier one "
                "trained, so its wall time is not the ablation's cost.")
    machine, stages = run["machine"], run["stage_seconds"]
    slowest = ", ".join(f"{k} {v / 60:.1f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])[:3])
    return (f"The ablation took {run['total_seconds'] / 60:.1f} min wall on {machine['cores']} "
            f"cores of {machine['cpu']} ({machine['backend']}; 1-min load average "
            f"{machine['load_average']:.1f} at the start, {run['load_average_at_end']:.1f} at the "
            f"end; longest stages in min: {slowest}).")


def results_markdown(report: dict) -> str:
    """The ablation's tables: spoken accuracy per condition with 95% intervals, the same for
    the text channel, controls against chance, and the headline numbers."""
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:,.3g}" if isinstance(value, float) else f"{value:,}"

    strategies, conditions = report["strategies"], report["conditions"]
    judge = report["judge"]
    first = next(iter(strategies.values()))["conditions"]
    sizes = ", ".join(f"{c} {first[c]['questions']}" for c in conditions if c in first)
    lines = ["# Strategy ablation", "",
             f"Questions per condition: {sizes}. Every question is asked in a voice no model "
             "heard in training; greedy decoding. A reply is right only when it is exactly the "
             "answer word; intervals are 95% Wilson intervals. The judge (a CTC recognizer "
             "trained on the corpus, never on the assistant's voice) has CER "
             f"{judge['heldout_voices']['cer']:.3f} on held-out voices and "
             f"{judge['assistant_voice']['cer']:.3f} on held-out speech in the assistant's voice, "
             f"whose lone reference answers it hears exactly {judge['assistant_voice']['exact']:.0%} "
             "of the time: the ceiling of every spoken accuracy.", "",
             "Conditions: `voices` (training phrasings), `phrasings` (held-out phrasings), "
             "`transfer` (facts seen only in text, asked by voice), the `voices` questions "
             "perturbed (noise at 20/10 dB SNR, speed x0.85/x1.15, 3 kHz low-pass, a 44.1 kHz "
             "stereo file) or written (`text`; `transfer_text` for the text-only facts), and "
             "the controls `silence` and `shuffled` (another question's audio), which must sit "
             "at chance.", "", run_cost(report), ""]
    spoken = [c for c in conditions if c not in TEXT_CONDITIONS]
    lines += ["## Answers heard by the judge in the spoken reply", "",
              "| strategy | " + " | ".join(spoken) + " |", "|---" * (len(spoken) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(interval(r["conditions"].get(c, {}).get("spoken"))
                                         for c in spoken) + " |" for name, r in strategies.items()]
    lines += ["", "## Answers in the text channel", "",
              "| strategy | " + " | ".join(conditions) + " | modality gap (text - voices) |",
              "|---" * (len(conditions) + 2) + "|"]
    for name, r in strategies.items():
        c = r["conditions"]
        gap = (c["text"]["answer"]["accuracy"] - c["voices"]["answer"]["accuracy"]
               if "text" in c and "voices" in c else None)
        lines.append(f"| {name} | " + " | ".join(interval(c.get(k, {}).get("answer"))
                                                 for k in conditions) + f" | {cell(gap)} |")
    controls = [c for c in CONTROLS if c in first]
    if controls:
        lines += ["", "## Controls against chance", "",
                  "Chance: always the most common answer (`majority`), or answers guessed as "
                  "often as they occur (`matched`, what a shuffled question scores).", "",
                  "| strategy | " + " | ".join(f"{c} (text / spoken)" for c in controls)
                  + " | chance majority / matched |", "|---" * (len(controls) + 2) + "|"]
        for name, r in strategies.items():
            c = r["conditions"]
            odds = c[controls[0]]["chance"]
            lines.append(f"| {name} | " + " | ".join(
                f"{c[k]['answer']['accuracy']:.3f} / {cell((c[k].get('spoken') or {}).get('accuracy'))}"
                for k in controls) + f" | {odds['majority']:.3f} / {odds['matched']:.3f} |")
    lines += ["", "## Headline (`voices`; latency from replies timed one at a time)", "",
              "| strategy | " + " | ".join(HEADLINE) + " |", "|---" * (len(HEADLINE) + 1) + "|"]
    for name, result in strategies.items():
        lines.append(f"| {name} | " + " | ".join(cell(result.get(k)) for k in HEADLINE) + " |")
    lines += ["", "Plots: `accuracy_by_condition.png`, `accuracy_vs_latency.png`, `loss_curves.png`."]
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- ablation results: written by `slm results`, do not edit -->"
README_END = "<!-- end of ablation results -->"
FEATURES_BEGIN = "<!-- units vs features: written by `slm results`, do not edit -->"
FEATURES_END = "<!-- end of units vs features -->"
DEMO_BEGIN = "<!-- demo loss: written by `slm results --demo`, do not edit -->"
DEMO_END = "<!-- end of demo loss -->"
DEMO_FIGURE = "docs/demo_loss.png"  # beside the README
POSTTRAIN_BEGIN = "<!-- post-training results: written by `slm results --posttrain`, do not edit -->"
POSTTRAIN_END = "<!-- end of post-training results -->"


def _pooled(summaries: list[dict], channel: str) -> dict | None:
    """One accuracy over several conditions' answers (the perturbations), with its interval."""
    parts = [s[channel] for s in summaries if s.get(channel)]
    if not parts:
        return None
    hits, n = sum(round(p["accuracy"] * p["n"]) for p in parts), sum(p["n"] for p in parts)
    low, high = wilson(hits, n)
    return {"accuracy": hits / n, "low": low, "high": high, "n": n}


def readme_table(report: dict) -> str:
    """The README's view, two tables: the answer in the text channel, and the answer heard by
    the judge in the spoken reply, per strategy on each spoken test set, the six
    perturbations pooled, the written questions (text channel only) and the controls, each
    with its 95% interval; then chance and the judge's own error."""
    columns = [*SPOKEN_SETS, "perturbed (6 pooled)", *TEXT_CONDITIONS, *CONTROLS]
    lines = []
    for title, channel in (("Answer in the text channel", "answer"),
                           ("Answer heard by the judge in the spoken reply", "spoken")):
        lines += [f"{title}:", "", "| strategy | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for name, result in report["strategies"].items():
            c = result["conditions"]
            cells = [c.get(s, {}).get(channel) for s in SPOKEN_SETS]
            cells.append(_pooled([c[p] for p in PERTURBED if p in c], channel))
            cells += [c.get(t, {}).get("answer") if channel == "answer" else None
                      for t in TEXT_CONDITIONS]
            cells += [c.get(k, {}).get(channel) for k in CONTROLS]
            lines.append(f"| {name} | " + " | ".join(interval(x) for x in cells) + " |")
        lines.append("")
    first = next(iter(report["strategies"].values()))["conditions"]
    judge, odds = report["judge"], first.get("silence", first["voices"])["chance"]
    sizes = sorted({s["questions"] for s in first.values()})
    lines += [f"Questions per condition: {', '.join(map(str, sizes))}. Chance (the most "
              f"common answer): {odds['majority']:.3f}; matched guessing: {odds['matched']:.3f}. "
              f"Judge CER on held-out reference speech: {judge['heldout_voices']['cer']:.3f} "
              f"(new voices), {judge['assistant_voice']['cer']:.3f} (the assistant's voice, "
              "never trained on); it hears "
              f"{judge['assistant_voice']['exact']:.0%} of the assistant's "
              "reference answers exactly, the ceiling of every spoken column.", "", run_cost(report)]
    return "\n".join(lines)


def units_vs_features_table(units: dict, features: dict) -> str:
    """The same strategies hearing the user as unit ids or as encoder frames: text-channel
    accuracy per spoken test set, the perturbations pooled and the controls, with intervals,
    and the difference on held-out voices."""
    columns = [*SPOKEN_SETS, "perturbed (6 pooled)", *CONTROLS]
    lines = ["| strategy | input | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name in [n for n in units["strategies"] if n in features["strategies"]]:
        for label, report in (("units", units), ("features", features)):
            c = report["strategies"][name]["conditions"]
            cells = [c.get(s, {}).get("answer") for s in SPOKEN_SETS]
            cells.append(_pooled([c[p] for p in PERTURBED if p in c], "answer"))
            cells += [c.get(k, {}).get("answer") for k in CONTROLS]
            lines.append(f"| {name} | {label} | " + " | ".join(interval(x) for x in cells) + " |")
    lines += ["", f"Answers in the text channel, {features['questions']} questions per condition, "
              "both runs on the same corpus, tokenizers and step budget; `features` hears the "
              "unit tokenizer's own encoder frames (what its k-means quantizes) through the "
              "projector `model.speech_input`."]
    return "\n".join(lines)


def demo_loss_text(history: list[dict], strategy: str) -> str:
    """The demo's training vs held-out loss in numbers, and what they say."""
    task = next((t for t in ("dialogue", "asr", "tts") if any(f"eval/{t}/loss" in h for h in history)),
                None)
    if task is None:
        raise DataError("the demo's history has no held-out loss: train it with eval.every_steps > 0")
    held = [(h["step"], h[f"eval/{task}/loss"], h["loss"]) for h in history if f"eval/{task}/loss" in h]
    best_step, best, _ = min(held, key=lambda x: x[1])
    last_step, last, train_last = held[-1]
    # the first evaluation from which the held-out loss stays within a factor of 2 of its best
    settled = next(step for i, (step, _, _) in enumerate(held)
                   if all(loss <= 2 * best for _, loss, _ in held[i:]))
    train_settled = next(loss for step, _, loss in held if step == settled)
    plateau = (f"the held-out loss levels off by step {settled} (within a factor of 2 of its best, "
               f"{best:.3g} at step {best_step}) while the training loss goes on from "
               f"{train_settled:.2g} to {train_last:.2g}")
    if last > 1.1 * best:
        verdict = (f"{plateau}, and the held-out loss ends higher ({last:.3g} at step "
                   f"{last_step}): past step {settled} the model memorizes its training "
                   "dialogues rather than learning what carries over to new ones")
    else:
        verdict = (f"{plateau}; it has not turned up by step {last_step}, so the run is near the "
                   "end of what these steps teach about new dialogues")
    return (f"![training vs held-out loss of the demo model]({DEMO_FIGURE})\n\n"
            f"`slm demo` ({strategy}): the held-out `{task}` loss, on the same batches of the "
            f"held-out split at {len(held)} points of the run; {verdict}.")


def fill_readme(readme: str | Path, report: dict | None, features: dict | None = None,
                units: dict | None = None, demo: str | None = None,
                posttrain: str | None = None) -> None:
    """Replace the README's generated blocks: the ablation's tables; with `features` (an
    ablation whose strategies hear features) the units-vs-features table, whose units side is
    `units` (an ablation run with the same code and settings; default: `report`); with `demo`
    (`demo_loss_text`) the demo's loss curve; with `posttrain`
    (`slm.posttrain.report.compare_readme`) the post-training comparison."""
    readme = Path(readme)
    text = readme.read_text("utf-8")
    if report is not None:
        text = _replace_block(readme, text, README_BEGIN, README_END, readme_table(report))
    if demo is not None:
        text = _replace_block(readme, text, DEMO_BEGIN, DEMO_END, demo)
    if posttrain is not None:
        text = _replace_block(readme, text, POSTTRAIN_BEGIN, POSTTRAIN_END, posttrain)
    if features is not None:
        text = _replace_block(readme, text, FEATURES_BEGIN, FEATURES_END,
                              units_vs_features_table(units or report, features))
    atomic.write_text(readme, text)


def _replace_block(readme: Path, text: str, begin: str, end: str, content: str) -> str:
    block = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not block.search(text):
        raise DataError(f"{readme}: no block between {begin!r} and {end!r}")
    return block.sub(lambda _: f"{begin}\n{content}\n{end}", text)
