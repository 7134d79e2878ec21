"""Time to first audio and decode speed of each generation strategy, through the real sampler.

Each strategy gets a small random model with its own streams (configs/bench/strategies.yaml)
and one synthetic spoken exchange. How many reply steps come before every speech stream has
emitted audio is read off the strategy's layout of that exchange (a trained model samples
exactly that, as tests/test_strategy_acceptance.py checks); the sampler is then timed from the
prompt to that step, with the strategy's own sampling settings. Random weights would end
replies at random steps, so the policy's final phases are dropped and every reply runs its full
length; a step costs the same whatever its tokens are.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from slm.bench.machine import best_seconds
from slm.config import Config
from slm.model import SpeechLM
from slm.sample import Sampler
from slm.speech.codec import RVQCodec, RVQConfig
from slm.strategies import NAMES, make_strategy, with_strategy_streams
from slm.strategies.policy import DecodePolicy
from slm.types import Segment
from slm.vocab import Vocab

RATE = 50.0  # unit and codec frames per second of the synthetic speech


def spoken(role: str, vocab: Vocab, rng: np.random.Generator, pieces: list[int],
           frames: list[int], lead: int = 1) -> Segment:
    """A speech turn with every view (text pieces per word, units, codes, word times)."""
    n = lead + sum(frames)
    starts = lead + np.concatenate([[0], np.cumsum(frames)[:-1]])
    times = np.stack([starts, starts + np.asarray(frames)], 1) / RATE
    text, units = vocab.range("text"), vocab.range("units")
    codes = [vocab.range(f"ac{q}") for q in range(vocab.num_codebooks)]
    return Segment(
        role, "speech", text=rng.integers(text.start, text.stop, sum(pieces)).astype(np.int32),
        word_ends=np.cumsum(pieces).astype(np.int32),
        units=rng.integers(units.start, units.stop, n).astype(np.int32),
        codes=np.stack([rng.integers(c.start, c.stop, n) for c in codes]).astype(np.int32),
        word_times=times.astype(np.float32))


def exchange(name: str, vocab: Vocab, seed: int) -> tuple[list[Segment], list[Segment]]:
    """A spoken question and a three-word spoken answer, in the views `name` lays out
    (interleaved continues the user's units with the answer's text, then its speech)."""
    rng = np.random.default_rng(seed)
    user = spoken("user", vocab, rng, [2, 1, 2], [6, 5, 7])
    answer = spoken("assistant", vocab, rng, [2, 2, 1], [8, 7, 6])
    if name == "interleaved":
        return ([Segment("user", "speech", units=user.units)],
                [Segment("assistant", "text", text=answer.text),
                 Segment("assistant", "speech", units=answer.units)])
    return [user], [answer]


def steps_to_first_audio(reply_kt: np.ndarray, vocab: Vocab) -> int:
    """The reply step by which every stream that speaks has emitted audio (units or codes)."""
    kinds = np.vectorize(lambda t: vocab.range_of(int(t)).kind)(reply_kt)
    audio_kt = np.isin(kinds, ("units", "acoustic"))
    heard_t = np.logical_and.reduce(np.cumsum(audio_kt[audio_kt.any(1)], 1) > 0)
    return int(np.argmax(heard_t))


def endless(policy: DecodePolicy) -> DecodePolicy:
    return DecodePolicy(tuple(dataclasses.replace(r, final=np.zeros_like(r.final))
                              for r in policy.rules))


def bench_strategy(config: Config, vocab: Vocab, name: str, steps: int = 64,
                   rounds: int = 3) -> dict:
    # Each strategy with its default options: one strategy's options are not another's.
    strategy_config = dataclasses.replace(config.strategy, name=name, options={})
    config = dataclasses.replace(config, strategy=strategy_config)
    config = with_strategy_streams(config, vocab)
    strategy = make_strategy(config.strategy, vocab)
    user, reply = exchange(name, vocab, config.seed)
    prompt = strategy.prompt(user, vocab).tokens
    full = strategy.layout(user + reply, vocab).tokens
    first = steps_to_first_audio(full[:, prompt.shape[1]:], vocab)
    model = SpeechLM(config.model, vocab, nnx.Rngs(config.seed))
    sampler = Sampler(model, endless(strategy.policy(vocab)), vocab, max_steps=steps)
    key = jax.random.key(config.seed)
    best = {"first_audio": np.inf, "steps": np.inf}
    for _ in range(rounds + 1):  # the first round compiles
        begin = time.perf_counter()
        loop = jax.block_until_ready(sampler.advance(sampler.start(prompt[None], key, steps),
                                                     first + 1))
        heard = time.perf_counter()
        jax.block_until_ready(sampler.advance(loop, steps))
        done = time.perf_counter()
        best["first_audio"] = min(best["first_audio"], heard - begin)
        best["steps"] = min(best["steps"], (done - heard) / (steps - first - 1))
    return {"streams": len(model.streams), "depth_decoder": model.depth is not None,
            "prompt_steps": int(prompt.shape[1]), "steps_to_first_audio": first,
            "ms_to_first_audio": 1e3 * best["first_audio"], "step_ms": 1e3 * best["steps"],
            "steps_per_s": 1 / best["steps"], "tokens_per_s": len(model.streams) / best["steps"]}


def codec_seconds(vocab: Vocab, frames: int = 2, rounds: int = 3) -> float:
    """The fastest decoding of a reply's first `frames` codec frames into a wave (two frames:
    the first hop of sound) by the RVQ codec (slm.speech.codec: Griffin-Lim, jitted, on the
    device), with random codebooks of the vocabulary's sizes: its cost does not depend on the
    codes."""
    cfg = RVQConfig(num_codebooks=vocab.num_codebooks, codebook_size=vocab.range("ac0").size)
    rng = np.random.default_rng(0)
    codec = RVQCodec(cfg, rng.normal(0.0, 1.0, (cfg.num_codebooks, cfg.codebook_size, cfg.n_mels)))
    codes = rng.integers(0, cfg.codebook_size, (cfg.num_codebooks, frames)).astype(np.int32)
    codec.decode(codes)  # compile
    return best_seconds(lambda: codec.decode(codes), rounds)


def bench_strategies(config: Config, vocab: Vocab, steps: int = 64, rounds: int = 3) -> dict:
    """Each strategy's sampler timings, and its first sound: first audio plus codec decoding."""
    codec_ms = 1e3 * codec_seconds(vocab, rounds=rounds)
    results = {name: bench_strategy(config, vocab, name, steps, rounds) for name in NAMES}
    return {name: {**r, "codec_ms": codec_ms, "ms_to_first_sound": r["ms_to_first_audio"] + codec_ms}
            for name, r in results.items()}
