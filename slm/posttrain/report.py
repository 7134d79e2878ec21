"""`slm posttrain compare`'s results as text: `results.md`, and the README's block of it.

Written from `results.json` only, so `slm results --posttrain DIR` can render the README's
block again without rerunning anything.
"""

from __future__ import annotations

from slm.eval.spoken_qa import TEXT_CONDITIONS
from slm.eval.tables import interval

START = "start"  # the SFT checkpoint's entry in `models`
CHAIN = "+"  # a run `kd+dpo`: DPO from KD's result


def display(name: str) -> str:
    return "start (SFT)" if name == START else name.replace(CHAIN, " -> ")


def signed(diff: dict | None) -> str:
    """A difference and its 95% interval."""
    if not diff:
        return "-"
    return f"{diff['difference']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]"


def verdict(diff: dict) -> str:
    """What a change against the start says once its interval is read."""
    if diff["low"] > 0:
        return "helps"
    if diff["high"] < 0:
        return "hurts"
    return "no clear change"


def results_table(report: dict) -> list[str]:
    """Per model: each spoken test set's accuracy, its written twin's and the modality gap
    between them, the change against the start and what it says; the judge's hearing of the
    spoken reply (with a judge); and the reward-hacking watch on the first spoken set."""
    models = report["models"]
    first = models[START]["conditions"]
    spoken = [c for c in first if c not in TEXT_CONDITIONS]
    written_of = {s: w for w, s in TEXT_CONDITIONS.items() if s in spoken}
    primary = spoken[0]
    judged = any("spoken" in m["conditions"].get(primary, {}) for m in models.values())
    header = ["model"]
    for s in spoken:
        header.append(f"{s} (asked by voice)")
        if s in written_of:
            header += [f"{written_of[s]} (written)", f"gap: {written_of[s]} - {s}"]
        header += [f"{s}: change vs start", "verdict"]
    if judged:
        header.append(f"{primary}: answer heard by the judge")
    header += [f"{primary}: repeats a {report['settings']['ngram']}-gram", "reply tokens",
               "reply words"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, model in models.items():
        c = model["conditions"]
        cells = [display(name)]
        for s in spoken:
            cells.append(interval(c.get(s, {}).get("answer")))
            if s in written_of:
                cells += [interval(c.get(written_of[s], {}).get("answer")),
                          signed(model["modality_gap"].get(s))]
            change = model.get("vs_start", {}).get(s)
            cells += [signed(change), verdict(change) if change else "-"]
        watch = c[primary]
        if judged:
            cells.append(interval(watch.get("spoken")))
        cells += [interval(watch["repetition"]), f"{watch['reply_tokens']:.1f}",
                  f"{watch['reply_words']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def training_table(report: dict) -> list[str]:
    """Per run and link: steps, minutes, and the mean of its first and last fifth of steps.
    A chain's link that is a run of its own (kd in kd -> dpo) is that run, shown once."""
    def change(link: dict, key: str) -> str:
        if key not in link["first"]:
            return "-"
        return f"{link['first'][key]:.3f} -> {link['last'][key]:.3f}"

    keys = ("reward", "accuracy", "kl", "ties", "loss", "reply_steps")
    lines = ["| run | link | steps | minutes | reward | rollout accuracy | KL | DPO ties | loss | "
             "reply steps |", "|---" * 10 + "|"]
    models = report["models"]
    for name, model in models.items():
        for link in model.get("training", []):
            if link["run"] != name and link["run"] in models:
                continue
            lines.append(f"| {display(name)} | {link['method']} | {link['steps']} | "
                         f"{link['seconds'] / 60:.1f} | "
                         + " | ".join(change(link, k) for k in keys) + " |")
    return lines


def rollout_text(report: dict) -> str:
    r = report["rollout"]
    return (f"Rollout throughput of the start model (batch {r['batch']}: one step's GRPO "
            f"questions x group; {r['streams']} streams, {r['reply_steps']} reply steps, best "
            f"of {r['rounds']} rounds): post-training's rollouts "
            f"{r['rollout_tokens_per_s']:,.0f} tokens/s, the same sampler alone "
            f"{r['decode_tokens_per_s']:,.0f} tokens/s ({r['rollout_vs_decode']:.2f}x; "
            "the goal is 1).")


def settings_text(report: dict) -> str:
    s, models = report["settings"], report["models"]
    sizes = ", ".join(f"{c} {x['questions']}" for c, x in models[START]["conditions"].items())
    overrides = " ".join(f"`{o}`" for o in report["overrides"]) or "none"
    return (f"Every run starts from `{report['checkpoint']}` and trains {s['steps']} steps per "
            f"method (a chain `a -> b`: b from a's result, which is also its reference), "
            f"overrides: {overrides}. Held-out questions per condition: {sizes}, in voices no "
            "training example used, answered greedily; a reply is right only when it is "
            "exactly the answer word. Accuracies carry 95% Wilson intervals; differences "
            "(gap, change) Newcombe's interval from them, which ignores that both sides answer "
            "the same questions and so errs wide: 'helps' and 'hurts' mean the interval "
            "excludes 0. Reward hacking: the share of replies whose text channel repeats a "
            f"word {s['ngram']}-gram, and the mean reply length in sampled tokens (steps x "
            "streams) and words.")


def compare_markdown(report: dict) -> str:
    return "\n".join([
        "# Post-training methods from one SFT checkpoint", "", settings_text(report), "",
        "## Accuracy, modality gap and reward hacking", "", *results_table(report), "",
        "## Training (mean of the first and last fifth of each link's steps)", "",
        *training_table(report), "", "## Rollout throughput", "", rollout_text(report), "",
        f"The comparison took {report['total_seconds'] / 60:.1f} min wall on "
        f"{report['machine']['cores']} cores of {report['machine']['cpu']}."]) + "\n"


def compare_readme(report: dict) -> str:
    """The README's view: the results table, what it was measured on, and the rollouts."""
    return "\n".join([*results_table(report), "", settings_text(report), "",
                      rollout_text(report)])
