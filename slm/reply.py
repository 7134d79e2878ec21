"""Spoken replies: a model, its strategy and its tokenizers turn user turns into text + speech.

`Speaker.reply` samples a whole reply on device and decodes it once; `Speaker.stream` runs the
same compiled loop chunk by chunk and yields text pieces and audio as soon as they exist,
which is what a voice interface plays while the model is still thinking.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Sequence

import jax
import numpy as np

from slm.config import Config, StrategyConfig
from slm.data.tokenizers import Heard, TokenizerSet
from slm.errors import AudioError, TaskError
from slm.model import SpeechLM
from slm.sample import GREEDY, Sampler, StreamSampling
from slm.strategies.base import STRATEGIES, Strategy, assistant_turn
from slm.strategies.hearing import Hearing
from slm.strategies.tasks import timed_words
from slm.text.tokenizer import TextTokenizer
from slm.types import Grid, Segment
from slm.vocab import Vocab


STREAM_CONTEXT_FRAMES = 16  # frames decoded again before each streamed chunk (0.32 s at 50 Hz)
MIN_QUESTION_SECONDS = 0.1  # shorter than any spoken word: nothing to hear


@dataclasses.dataclass
class Reply:
    text: str  # what the assistant said, as text (empty if it only spoke)
    segments: list[Segment]  # the assistant turn(s) read back from the grid
    wave: np.ndarray | None  # the spoken reply at `sample_rate`, None if it did not speak
    sample_rate: int
    grid: Grid  # prompt + reply columns
    steps: int  # reply steps sampled
    steps_to_first_text: int  # -1: no text
    steps_to_first_audio: int  # -1: no complete audio frame
    seconds: float  # wall time of sampling (prefill + steps; includes compiling on a first call)
    seconds_to_first_text: float | None  # prefill + that many mean step times (None: never)
    seconds_to_first_audio: float | None

    @property
    def written(self) -> np.ndarray:
        """The reply's ids on the first (text) stream."""
        return self.grid.tokens[0, self.grid.steps - self.steps:]


@dataclasses.dataclass
class Chunk:
    """What became known during one streaming chunk."""

    step: int  # reply steps sampled so far
    text: str  # new text since the previous chunk
    audio: np.ndarray | None  # new audio since the previous chunk
    seconds: float  # since the stream started


class Speaker:
    def __init__(self, model: SpeechLM, strategy: Strategy, vocab: Vocab, tokenizers: TokenizerSet,
                 sampling: tuple[StreamSampling, ...] | None = None, max_steps: int = 256,
                 cfg_scale: float = 1.0, hearing: Hearing = Hearing(), greedy: bool = False,
                 mesh=None):
        """`mesh`: decode across its devices (see `slm.sample.Sampler`); None: where the
        parameters are."""
        self.strategy, self.vocab, self.tokenizers = strategy, vocab, tokenizers
        if greedy:
            sampling = (GREEDY,) * len(model.streams)
        # a spoken question must reach the model as training examples did (slm.data.examples)
        self.hearing = hearing
        self.sampler = Sampler(model, strategy.policy(vocab), vocab, sampling, max_steps, cfg_scale,
                               mesh)
        self.max_steps = max_steps

    # -- questions ----------------------------------------------------------------------------
    def hear(self, wave: np.ndarray, sample_rate: int) -> Segment:
        """A spoken user turn: its units, codes and encoder frames, as the model hears them
        (its transcript is for the model to find). `wave`: mono float samples `[N]`."""
        wave = np.asarray(wave)
        if wave.ndim != 1 or wave.dtype.kind != "f":
            raise AudioError(f"a spoken question is mono float samples [N] in [-1, 1], got "
                             f"{wave.dtype} of shape {wave.shape}: mix channels to one (mean over "
                             "the channel axis) and scale integer PCM to [-1, 1] "
                             "(slm.speech.audio.load_audio does both for a file)")
        if wave.size < MIN_QUESTION_SECONDS * sample_rate:
            raise AudioError(f"a spoken question of {wave.size / sample_rate * 1000:.0f} ms is "
                             f"too short to hear; give at least {MIN_QUESTION_SECONDS} s of speech")
        return self.spoken_turn(self.tokenizers.listen(wave, sample_rate))

    def spoken_turn(self, heard: Heard) -> Segment:
        """The user turn of what `TokenizerSet.listen` heard (an evaluation listens to a
        question once and asks every model)."""
        codes = np.stack([self.vocab.codebook_id(q, row) for q, row in enumerate(heard.codes)])
        frames = heard.log_mel if self.hearing.frames == "log_mel" else heard.frames
        segment = Segment("user", "speech", units=self.vocab.unit_id(heard.units), codes=codes,
                          features=frames)
        return self.hearing.heard(segment, self.vocab)

    def prompt(self, user: Sequence[Segment]) -> Grid:
        """The grid the sampler prefills for these user turns."""
        return self.hearing.attach(self.strategy.prompt(user, self.vocab), user, self.vocab)

    def read(self, text: str) -> Segment:
        """A written user turn, tokenized word by word as the corpus was."""
        pieces = [self.tokenizers.text.encode(" " + w if i else w) for i, w in enumerate(text.split())]
        ids = np.array([p for word in pieces for p in word], np.int32)
        return Segment("user", "text", text=self.vocab.text_id(ids),
                       word_ends=np.cumsum([len(p) for p in pieces]).astype(np.int32))

    # -- whole replies ------------------------------------------------------------------------
    def reply(self, user: Sequence[Segment], key: jax.Array) -> Reply:
        """One reply, timed: prefill and steps are measured apart, so the time to first text
        and audio is prefill plus that many mean step times."""
        return self.replies([user], key)[0]

    def replies(self, users: Sequence[Sequence[Segment]], key: jax.Array) -> list[Reply]:
        """A reply to each user turn list, sampled together as one batch on device (prompts of
        different lengths share it, see `slm.sample.left_pad`). Each reply's `seconds` is its
        share of the batch's time; its times to first text and audio are batch times, which
        equal the reply's own only for a batch of one."""
        prompts = [self.prompt(user) for user in users]
        begin = time.perf_counter()
        loop = jax.block_until_ready(self.sampler.start(prompts, key, self.max_steps))
        prefill = time.perf_counter() - begin
        loop = self.sampler.advance(loop, self.max_steps)
        sampled = jax.device_get(self.sampler.result(loop))
        seconds = time.perf_counter() - begin
        per_step = (seconds - prefill) / max(int(loop.step), 1)

        def seconds_to(step: int) -> float | None:
            return None if step < 0 else prefill + per_step * (step + 1)

        grids = [self._reply_grid(np.asarray(sampled.tokens[b])[:, :int(sampled.length[b])])
                 for b in range(len(prompts))]
        turns = [assistant_turn(self.strategy, p, g, self.vocab) for p, g in zip(prompts, grids)]
        out = []
        for b, (prompt, reply, turn, wave) in enumerate(zip(prompts, grids, turns, self._speak(turns))):
            steps = reply.tokens.shape[-1]
            first_text, first_audio = int(sampled.first_text[b]), int(sampled.first_audio[b])
            out.append(Reply(text=self._text(turn), segments=turn, wave=wave,
                             sample_rate=self.sample_rate, grid=Grid.concat([prompt, reply]),
                             steps=steps, steps_to_first_text=first_text,
                             steps_to_first_audio=first_audio, seconds=seconds / len(prompts),
                             seconds_to_first_text=seconds_to(first_text),
                             seconds_to_first_audio=seconds_to(first_audio)))
        return out

    # -- streaming ----------------------------------------------------------------------------
    def stream(self, user: Sequence[Segment], key: jax.Array, chunk_steps: int = 8) -> Iterator[Chunk]:
        """Yield new text and audio every `chunk_steps` reply steps until the reply ends.

        Each chunk's audio is decoded together with the `STREAM_CONTEXT_FRAMES` frames before
        it, and only the new part is kept, so the codec or vocoder hears the context it hears
        in a whole reply and the chunks join into a wave of the whole reply's length.
        """
        prompt = self.prompt(user)
        begin = time.perf_counter()
        loop = self.sampler.start([prompt], key, self.max_steps)
        text_so_far, step = "", 0
        seen, played = 0, 0  # speech frames decoded so far, audio samples yielded so far
        while not self.sampler.finished(loop):
            step = min(step + chunk_steps, self.max_steps)
            loop = self.sampler.advance(loop, step)
            done = int(loop.step)
            reply = self._reply_grid(np.asarray(loop.tokens[0])[:, :done])
            turn = assistant_turn(self.strategy, prompt, reply, self.vocab)
            text = self._text(turn)
            frames = self._frames(turn)
            local = None if frames is None else self._local(frames)
            audio = None
            if local is not None and local.shape[-1] > seen:
                start = max(0, seen - STREAM_CONTEXT_FRAMES)  # sample start * hop onwards
                wave = self._synthesize([local[..., start:]])[0]
                audio = wave[played - start * self._hop:]
                played, seen = start * self._hop + wave.size, local.shape[-1]
            yield Chunk(done, text[len(text_so_far):], audio, time.perf_counter() - begin)
            text_so_far = text

    # -- decoding -----------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.tokenizers.codec.sample_rate

    @property
    def _hop(self) -> int:
        """Audio samples per speech frame."""
        return round(self.sample_rate / self.tokenizers.codec.frame_rate)

    @staticmethod
    def _reply_grid(reply_kt: np.ndarray) -> Grid:
        return Grid(reply_kt, np.zeros(reply_kt.shape, np.float32))

    def _text(self, turn: list[Segment]) -> str:
        return turn_text(turn, self.vocab, self.tokenizers.text)

    def timed_words(self, ids: Sequence[int]) -> list[tuple[str, float, float]]:
        """(word, start, end seconds) of a transcript written with timestamps
        (`strategy.task_format.timestamps`), e.g. `Reply.written`; empty without time tokens."""
        return [(self.tokenizers.text.decode(self.vocab.local("text", w.text).tolist()).strip(),
                 w.start, w.end) for w in timed_words(ids, self.vocab)]

    def _frames(self, turn: list[Segment]) -> np.ndarray | None:
        """Speech tokens of the turn: codes `[Q, T]` if it has them, else units `[T]`."""
        speech = [s for s in turn if s.modality == "speech"]
        if not speech:
            return None
        if speech[0].codes is not None:
            return np.concatenate([s.codes for s in speech], axis=-1)
        return np.concatenate([s.units for s in speech if s.units is not None])

    def _local(self, frames: np.ndarray) -> np.ndarray:
        """The whole frames as codec codes `[Q, T]` or unit indices `[T]`; frames holding a
        special id (a stream that ended early, as an untrained model's may) are left out
        rather than guessed."""
        if frames.ndim == 2:
            ranges = [self.vocab.range(f"ac{q}") for q in range(frames.shape[0])]
            whole = np.all([(row >= r.start) & (row < r.stop) for row, r in zip(frames, ranges)], 0)
            return np.stack([row[whole] - r.start for row, r in zip(frames, ranges)])
        units = self.vocab.range("units")
        return frames[(frames >= units.start) & (frames < units.stop)] - units.start

    def _synthesize(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Audio of each local frame array (see `_local`), decoded as one batch; no frame is
        silence."""
        waves = [np.zeros(0, np.float32)] * len(frames)
        present = [i for i, f in enumerate(frames) if f.shape[-1]]
        if present:
            decoder = self.tokenizers.codec if frames[present[0]].ndim == 2 else self.tokenizers.vocoder
            for i, wave in zip(present, decoder.decode_batch([frames[i] for i in present])):
                waves[i] = wave
        return waves

    def _speak(self, turns: list[list[Segment]]) -> list[np.ndarray | None]:
        """Each turn's spoken wave, all synthesized together; None where a turn has fewer than
        two speech frames (no audio to speak)."""
        frames = [self._frames(t) for t in turns]
        spoke = [i for i, f in enumerate(frames) if f is not None and f.shape[-1] >= 2]
        waves: list[np.ndarray | None] = [None] * len(turns)
        for i, wave in zip(spoke, self._synthesize([self._local(frames[i]) for i in spoke])):
            waves[i] = wave
        return waves


def turn_text(turn: Sequence[Segment], vocab: Vocab, text: TextTokenizer) -> str:
    """The turn's text; ids outside the text range (an untrained model may put a unit in a
    text run) are left out rather than guessed, as `Speaker._local` does for speech."""
    span = vocab.range("text")
    ids = [i for s in turn if s.text is not None for i in s.text.tolist()
           if span.start <= i < span.stop]
    return text.decode(vocab.local("text", np.array(ids, np.int32)).tolist())


def load_speaker(checkpoint_dir: str, tokenizers_dir: str | None = None, mesh=None,
                 task: str = "", **kwargs) -> Speaker:
    """A Speaker from a training checkpoint; refuses tokenizers of another vocabulary. `task`
    ("answer", "transcribe"): what its replies do; "" as trained. With a `mesh`, the
    parameters are restored onto it and replies decode across it; without one, on the mesh
    the training config names."""
    from slm.model.speech_input import hearing_for
    from slm.parallel.mesh import make_mesh
    from slm.strategies import make_strategy
    from slm.strategies.tasks import with_task_tokens
    from slm.train.checkpoint import load_model

    model, config, vocab = load_model(checkpoint_dir, mesh=mesh)
    mesh = mesh if mesh is not None else make_mesh(config.mesh)  # the one load_model used
    strategy_cfg = asked(config, task, str(checkpoint_dir))
    tokenizers = TokenizerSet.load(tokenizers_dir or config.tokenizers.dir)
    with_task_tokens(tokenizers.vocab(), config.strategy.task_format).check_compatible(
        vocab, str(checkpoint_dir))
    strategy = make_strategy(strategy_cfg, vocab, text=tokenizers.text)
    return Speaker(model, strategy, vocab, tokenizers, hearing=hearing_for(config, strategy),
                   mesh=mesh, **kwargs)


def asked(config: Config, task: str, where: str) -> StrategyConfig:
    """The strategy config whose replies do `task`: "" keeps the trained one, and so does
    "answer" for a strategy without task tags (its replies answer). Transcribing needs a model
    trained to: a strategy that tags tasks, with `asr` in its data mixture."""
    tagged = any(f.name == "task" for f in dataclasses.fields(STRATEGIES[config.strategy.name].options))
    if not task or (task == "answer" and not tagged):
        return config.strategy
    if task != "answer" and not tagged:
        raise TaskError(f"{where}: strategy {config.strategy.name!r} has no task tags, so its "
                        f"model cannot be asked to {task}; train a strategy that tags tasks "
                        "(chain_of_modality or text_driven) with asr in data.mixture")
    if task == "transcribe" and config.data.mixture.get("asr", 0.0) <= 0:
        raise TaskError(f"{where} was not trained to transcribe (data.mixture has no asr "
                        "pairs): train it with asr in the mixture, e.g. "
                        "'data.mixture={dialogue: 1.0, asr: 0.5}'")
    return dataclasses.replace(config.strategy, options={**config.strategy.options, "task": task})
