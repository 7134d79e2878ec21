"""Benchmark results as text: one line for the terminal, and BENCHMARKS.md from JSON files.

The markdown is generated, never edited by hand, so the table always matches the committed
JSON it came from (`slm bench report benchmarks/*.json`).
"""

from __future__ import annotations

import json
from pathlib import Path

from slm.bench.train import FLOP_ACCOUNTING


def _n(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def summary(result: dict) -> str:
    """One line for `slm bench ...` without --json."""
    if result["benchmark"] == "lora":
        full, lora = result["full"], result["lora"]
        return (f"lora: optimizer state {_n(full['optimizer_bytes'])} -> "
                f"{_n(lora['optimizer_bytes'])} bytes ({result['optimizer_bytes_ratio']:.1%}), "
                f"trained {result['trained_fraction']:.2%} of {_n(lora['params'])} parameters, "
                f"step {full['step_seconds'] * 1e3:.1f} -> {lora['step_seconds'] * 1e3:.1f} ms "
                f"({result['step_speedup']:.2f}x)")
    peer = (f" vs peer {_n(result['peer_tokens_per_s'])} tokens/s "
            f"({result['ratio_vs_peer']:.2f}x)" if result.get("peer_tokens_per_s") else "")
    line = f"{result['benchmark']}: {_n(result['tokens_per_s'])} tokens/s{peer}"
    if result["benchmark"] == "train":
        line += (f", MFU {result['mfu']:.2f} of a measured matmul peak of "
                 f"{result['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s")
    if result["benchmark"] == "decode":
        line += (f", {result['roofline_fraction']:.0%} of the memory-bandwidth roofline; "
                 f"post-training's rollout {_n(result['rollout_tokens_per_s'])} tokens/s "
                 f"({result['rollout_vs_decode']:.2f}x)")
    return line


def _machine(results: list[dict]) -> list[str]:
    m = next((r["machine"] for r in results if "machine" in r), None)
    if m is None:
        return []
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    loads = ", ".join(f"{r['benchmark']} {r['machine']['load_average']:.1f}"
                      for r in results if "load_average" in r.get("machine", {}))
    return [f"Machine: {m['cpu']} ({m.get('isa')}), {m['cores']} cores, backend {m['backend']} "
            f"({m['device']}); Python {m['python']}; {versions}.", "",
            f"One-minute load average when each benchmark started ({loads}; above zero, other "
            "processes shared the cores). Timings are best-of-rounds, and every fraction "
            "(MFU, roofline) divides by a limit measured beside the work it judges.", ""]


def _train(r: dict) -> list[str]:
    b = r["batch"]
    return [
        "## Train step", "",
        f"`{r.get('config', '')}`: {r['params'] / 1e6:.1f}M parameters, batch {b[0]} x {b[2]} "
        f"tokens, {r['dtype']}; the fastest step of {r['rounds']} rounds of "
        f"{r['steps_per_round']} steps (each side).",
        "",
        "| | tokens/s | step (s) | MFU |",
        "|---|---:|---:|---:|",
        f"| slm (JAX) | {_n(r['tokens_per_s'])} | {_n(r['step_seconds'], 2)} | {r['mfu']:.2f} |",
        f"| transformers + torch (torch threads: {r.get('peer_threads')}) | "
        f"{_n(r['peer_tokens_per_s'])} | "
        f"{_n(r['peer_step_seconds'], 2)} | |",
        "",
        f"Ratio slm / peer: **{_n(r['ratio_vs_peer'], 2)}**. MFU is against the machine's matmul "
        f"peak measured in the same run: **{r['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s** "
        f"({r['dtype']}; the best library's rate of 1024^2 and 2048^2 matmuls sustained for "
        f"1 s: {_peaks(r)}); "
        f"{r['flops_per_step'] / 1e9:,.0f} GFLOP per step.", "", *_vendor(r),
        f"FLOP accounting: {FLOP_ACCOUNTING}.", ""]


def _vendor(r: dict) -> list[str]:
    """MFU against the datasheet's peak, where the chip is known (slm.bench.machine)."""
    if not r.get("vendor_peak_flops"):
        return []
    return [f"Against the datasheet's dense bfloat16 peak of {r['machine']['device']} "
            f"({r['vendor_peak_flops'] / 1e12:,.0f} TFLOP/s): MFU **{r['mfu_vs_vendor']:.2f}**.",
            ""]


def _peaks(r: dict) -> str:
    peaks = r.get("matmul_peaks") or {"jax": r["matmul_peak_flops"]}
    return ", ".join(f"{library} {rate / 1e9:,.0f}" for library, rate in peaks.items())


def _decode(r: dict) -> list[str]:
    lines = [
        "## Decode", "",
        f"`{r.get('config', '')}`, {r['dtype']}, greedy; each row generates exactly the same "
        "number of new tokens on both sides. tokens/s counts prefill and steps; the roofline "
        "counts steps only: every weight plus the live keys and values read once per step, at "
        "the memory bandwidth measured in the same run (the rate of a matrix-vector product "
        "over 512 MB, sustained for 1 s). The roofline fraction is the median over rounds of "
        "each round's decode against the bandwidth measured right after it; the bandwidth "
        "column and the last one use the best bandwidth of the run instead (on a shared "
        "machine the best decode and the best bandwidth rarely come from the same moment). "
        "Rollout: post-training's sampling of the same replies (`slm.posttrain.rollout`: the "
        "same sampler, then one teacher-forced pass for the log-probs), timed in the same "
        "rounds; its last column is its tokens/s over slm's (the goal: 1).",
        "",
        "| batch | slm tokens/s | peer tokens/s (torch threads) | ratio | step (ms) | "
        "bandwidth (GB/s) | roofline tokens/s | roofline fraction | best vs best | "
        "rollout tokens/s | rollout / slm |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b, x in r["batches"].items():
        lines.append(f"| {b} | {_n(x['tokens_per_s'])} | {_n(x['peer_tokens_per_s'])} "
                     f"({x.get('peer_threads')}) | "
                     f"{_n(x['ratio_vs_peer'], 2)} | {x['step_ms']:.2f} | "
                     f"{x['memory_bandwidth'] / 1e9:.1f} | "
                     f"{_n(x['roofline_tokens_per_s'])} | {x['roofline_fraction']:.2f} | "
                     f"{x['roofline_fraction_best']:.2f} | {_n(x.get('rollout_tokens_per_s'))} | "
                     f"{_n(x.get('rollout_vs_decode'), 2)} |")
    lines.append("")
    if "strategies" in r:
        lines += [
            "### Time to first audio per strategy", "",
            "Small random models (`configs/bench/strategies.yaml`), batch 1, the strategies' "
            "own sampling settings. First audio: the reply step by which every speech stream "
            "has emitted a unit or code. First sound adds the codec's decoding of the first two "
            "frames into a wave (`slm.speech.codec`'s RVQ codec, Griffin-Lim on the device; "
            "the unit-only strategies' vocoders are not timed).", "",
            "| strategy | streams | depth decoder | steps to first audio | ms to first audio | "
            "codec (ms) | ms to first sound | step (ms) | tokens/s |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for name, x in r["strategies"].items():
            lines.append(f"| {name} | {x['streams']} | {'yes' if x['depth_decoder'] else 'no'} "
                         f"| {x['steps_to_first_audio']} | {x['ms_to_first_audio']:.1f} | "
                         f"{_n(x.get('codec_ms'), 1)} | {_n(x.get('ms_to_first_sound'), 1)} | "
                         f"{x['step_ms']:.2f} | {_n(x['tokens_per_s'])} |")
        lines.append("")
    return lines


def _data(r: dict) -> list[str]:
    return ["## Input pipeline", "",
            f"`{r.get('config', '')}` (source {r['source']}), batch {r['batch']}: the pipeline "
            f"delivers {_n(r['tokens_per_s'])} tokens/s, the train step consumes "
            f"{_n(r['peer_tokens_per_s'])} tokens/s ({r['ratio_vs_peer']:.1f}x).", ""]


def _lora(r: dict) -> list[str]:
    b, adapters = r["batch"], r["adapters"]
    rows = [f"| {name} | {_n(x['params'])} | {_n(x['trained_params'])} | "
            f"{_n(x['optimizer_bytes'])} | {x['step_seconds'] * 1e3:.1f} |"
            for name, x in (("full fine-tuning", r["full"]), ("LoRA", r["lora"]))]
    return [
        "## Full fine-tuning vs LoRA", "",
        f"`{r.get('config', '')}`, batch {b[0]} x {b[2]}: the model trained whole, and the same "
        f"model with rank-{adapters['rank']} adapters on {', '.join(adapters['targets'])} "
        "trained alone (`train.trainable: [lora]`); the fastest step of "
        f"{r['rounds']} alternating rounds of {r['steps_per_round']} steps each.", "",
        "| | parameters | trained | optimizer state (bytes) | step (ms) |",
        "|---|---:|---:|---:|---:|", *rows, "",
        f"LoRA trains {r['trained_fraction']:.2%} of the parameters, keeps "
        f"{r['optimizer_bytes_ratio']:.1%} of the optimizer state, and steps "
        f"**{r['step_speedup']:.2f}x** as fast; its compiled step does "
        f"{r['flops_ratio']:.0%} of the full step's FLOPs (XLA's count).", ""]


def _stream(r: dict) -> list[str]:
    def cell(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [f"| {x['omega']} | {cell(x['steps_to_first_audio'], '.1f')} | "
            f"{cell(x['ms_to_first_audio'], '.0f')} | {x['speech_cer']:.3f} | "
            f"{x['spoke']}/{x['replies']} |" for x in r["omegas"]]
    return [
        "## Streaming pace: text-driven replies every Ω text tokens", "",
        f"`{r['checkpoint']}` ({r['strategy']}), greedy, the first {r['questions']} `voices` "
        "questions: each reply streamed through `Speaker.stream` with a chunk every Ω text "
        "tokens; median reply steps and ms to the first chunk holding audio (compiling "
        "excluded), and the judge's CER of the streamed speech against the reply's own text. "
        f"Measured on {r['machine']['cpu']} ({r['machine']['cores']} cores, one-minute load "
        f"{r['machine']['load_average']:.1f} at the start).", "",
        "| Ω | steps to first audio | ms to first audio | speech CER | spoke |",
        "|---:|---:|---:|---:|---:|", *rows, ""]


SECTIONS = {"train": _train, "decode": _decode, "data": _data, "lora": _lora, "stream": _stream}


def markdown(results: list[dict]) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `slm bench report` from the JSON files in `benchmarks/`; timings are "
             "the best of several rounds, slm and its peer alternating in one process. The "
             "peer (transformers + torch on the CPU) is timed with torch on all cores and on "
             "one, and keeps its better time.", ""]
    lines += _machine(results)
    for r in sorted(results, key=lambda r: list(SECTIONS).index(r["benchmark"])):
        lines += SECTIONS[r["benchmark"]](r)
    return "\n".join(lines)


def write_report(paths: list[str | Path], out: str | Path) -> Path:
    results = [json.loads(Path(p).read_text()) for p in paths]
    out = Path(out)
    out.write_text(markdown(results))
    return out
