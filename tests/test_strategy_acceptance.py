"""Acceptance of the five generation strategies (and a test-only one) end to end.

For each strategy a tiny SpeechLM is trained with the unchanged trainer until it memorises
three short spoken dialogues laid out by the strategy; then the unchanged sampler, steered only
by the strategy's decode policy, must reproduce every reply exactly from its prompt, and the
strategy must read the reply back into the assistant's views. On top of that:
- the cached sampler equals a recompute-everything greedy reference for every strategy (for
  text_driven's CTC unit decoder: tests/test_unit_decoder.py);
- the sampler's steps-to-first-audio equal what each layout predicts, and the parallel and
  coarse-to-fine strategies speak before chain of modality on the same dialogue;
- a test-only strategy (`tests/word_by_word.py`) trains and decodes with nothing changed in `slm/`.

The three dialogues share the shape of their user turn (so their prompts have one length and
are sampled as one batch) but not of their answers (so the rows finish on different steps).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
from typing import Callable

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from slm.config import (Config, DataConfig, DepthConfig, ModelConfig, OptimConfig, TrainConfig,
                        VocabConfig)
from slm.model import SpeechLM
from slm.sample import GREEDY, Sampled, Sampler
from slm.speech.runs import dedup_units
from slm.strategies.base import Strategy
from slm.strategies.chain_of_modality import ChainOfModality
from slm.strategies.coarse_to_fine import CoarseToFine
from slm.strategies.interleaved import Interleaved
from slm.strategies.parallel import Parallel
from slm.strategies.text_driven import TextDriven
from slm.train.trainer import train
from slm.types import Grid, Segment
from slm.vocab import Vocab
from tests.conftest import one_device_mesh
from tests.test_sample import reference_greedy
from tests.word_by_word import WordByWord

nnx.use_eager_sharding(False)

VOCAB_SIZES = dict(text_size=30, num_units=16, num_codebooks=2, codebook_size=8)
VOCAB = Vocab.build(**VOCAB_SIZES)
RATE = 50.0  # unit and codec frames per second
SEQ_LEN = 40  # every laid-out dialogue is padded to this many steps
STEPS = 150  # optimizer steps to memorise the dialogues (~25 already do)
LOSS_MARGIN = 0.02  # final training loss above the data's floor; untrained: ~ln(V_k) ~ 3-4
REPO = pathlib.Path(__file__).resolve().parent.parent


# --- dialogues --------------------------------------------------------------------------

def spoken(role: str, rng: np.random.Generator, pieces, frames, lead: int = 0) -> Segment:
    """A speech turn with every view: `pieces[w]` text pieces and `frames[w]` unit/codec frames
    per word, after `lead` silent frames. Word w spans its frames exactly, so the word times
    tile the speech after the lead (which coarse-to-fine's frame-quantized read-back returns
    exactly when the lead is >= 1 and every word has more frames than pieces)."""
    n = lead + sum(frames)
    starts = lead + np.concatenate([[0], np.cumsum(frames)[:-1]])
    times = np.stack([starts, starts + np.asarray(frames)], 1).astype(np.float64) / RATE
    return Segment(
        role, "speech",
        text=VOCAB.text_id(rng.integers(0, VOCAB_SIZES["text_size"], sum(pieces))),
        word_ends=np.cumsum(pieces).astype(np.int32),
        units=VOCAB.unit_id(rng.integers(0, VOCAB_SIZES["num_units"], n)),
        codes=np.stack([VOCAB.codebook_id(q, rng.integers(0, VOCAB_SIZES["codebook_size"], n))
                        for q in range(VOCAB_SIZES["num_codebooks"])]).astype(np.int32),
        word_times=times.astype(np.float32),
    )


@dataclasses.dataclass(frozen=True)
class Dialogue:
    user: Segment  # a question: transcript, units, codes, word alignment
    assistant: Segment  # the spoken answer: text, units, codes, word alignment


def dialogues() -> list[Dialogue]:
    """Three exchanges: the same user-turn shape (2 words, 3 pieces, 5 frames), answers of
    1-3 words and 6-8 frames, each after one silent frame."""
    rng = np.random.default_rng(2024)
    answers = [((2, 1), (3, 2)), ((1, 2, 1), (2, 3, 2)), ((3,), (5,))]
    return [Dialogue(spoken("user", rng, (1, 2), (2, 3)), spoken("assistant", rng, p, f, lead=1))
            for p, f in answers]


DIALOGUES = dialogues()


# --- what each strategy is given and must give back ------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """A strategy with the views of a dialogue it lays out and reads back.

    `user(d)` are the prompt segments, `reply(d)` the segments after them; `read_back(d)` is what
    `unlayout(prompt ++ reply)` must return, exactly. `trailing` counts layout columns after the
    reply's last sampled step (chain's `<eos>` follows the `<eoa>` that ends sampling).
    """

    strategy: Strategy
    user: Callable[[Dialogue], list[Segment]]
    reply: Callable[[Dialogue], list[Segment]]
    read_back: Callable[[Dialogue], list[Segment]]
    trailing: int = 0

    @property
    def name(self) -> str:
        return self.strategy.name

    def layout(self, d: Dialogue) -> Grid:
        return self.strategy.layout(self.user(d) + self.reply(d), VOCAB)

    def prompt(self, d: Dialogue) -> Grid:
        return self.strategy.prompt(self.user(d), VOCAB)


CASES = {case.name: case for case in [
    # SpiRit-LM has no roles: the user's speech is continued by the answer's text, then its
    # speech; every run reads back as a (role-less, "user") segment.
    Case(Interleaved(),
         user=lambda d: [Segment("user", "speech", units=d.user.units)],
         reply=lambda d: [Segment("assistant", "text", text=d.assistant.text),
                          Segment("assistant", "speech", units=d.assistant.units)],
         read_back=lambda d: [Segment("user", "speech", units=d.user.units),
                              Segment("user", "text", text=d.assistant.text),
                              Segment("user", "speech", units=d.assistant.units)]),
    # the reply writes the user's transcript, then the answer's text, then speaks it
    Case(ChainOfModality(),
         user=lambda d: [d.user], reply=lambda d: [d.assistant],
         read_back=lambda d: [Segment("user", "speech", text=d.user.text, units=d.user.units),
                              Segment("assistant", "speech", text=d.assistant.text,
                                   units=d.assistant.units)],
         trailing=1),
    # text and 2 codebooks (delays 0, 1, 2) on parallel temporal streams
    Case(Parallel("codes", user_transcript=True),
         user=lambda d: [d.user], reply=lambda d: [d.assistant],
         read_back=lambda d: [Segment("user", "speech", text=d.user.text, codes=d.user.codes),
                              Segment("assistant", "speech", text=d.assistant.text,
                                   codes=d.assistant.codes)]),
    # monologue + semantic on the temporal decoder, codebooks on the depth decoder
    Case(CoarseToFine(num_codebooks=2, acoustic_delay=1, frame_rate=RATE),
         user=lambda d: [d.user], reply=lambda d: [d.assistant],
         read_back=lambda d: [Segment("user", "speech", units=d.user.units, codes=d.user.codes),
                              d.assistant]),
    # the LM writes the answer, a CTC head on its states speaks it (4 unit slots per step);
    # units come back de-duplicated, one frame each (`unit_frames=1`)
    Case(TextDriven(upsample=4, unit_frames=1),
         user=lambda d: [d.user], reply=lambda d: [d.assistant],
         read_back=lambda d: [Segment("user", "speech", units=d.user.units),
                              Segment("assistant", "speech", text=d.assistant.text,
                                      units=dedup_units(d.assistant.units)[0])],
         trailing=1),
    # a test-only strategy, from tests/: typed question, each answer word written then spoken
    Case(WordByWord(unit_rate=RATE),
         user=lambda d: [Segment("user", "text", text=d.user.text)], reply=lambda d: [d.assistant],
         read_back=lambda d: [Segment("user", "text", text=d.user.text),
                              Segment("assistant", "speech", text=d.assistant.text,
                                   word_ends=d.assistant.word_ends, units=d.assistant.units)]),
]}
FOUR = ["interleaved", "chain_of_modality", "parallel", "coarse_to_fine"]


def fills(case: Case) -> np.ndarray:
    """Per stream, the id the sampler emits once the stream (or its row) has finished."""
    return np.array([rule.fill for rule in case.strategy.policy(VOCAB).rules])


def assert_segments(got: list[Segment], want: list[Segment], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} segments, want {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.same(b), f"{what}: segment {i} differs:\n got  {a}\n want {b}"


# --- the model and training -------------------------------------------------------------

def model_config(strategy: Strategy) -> ModelConfig:
    depth = DepthConfig()
    if isinstance(strategy, CoarseToFine):
        depth = DepthConfig(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, mlp_dim=64,
                            cond_stream=strategy.depth_cond_stream)
    heads = {"ctc_units": {"d_model": 32, "num_heads": 2, "mlp_dim": 64}} if isinstance(
        strategy, TextDriven) else {}
    return ModelConfig(d_model=48, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
                       max_seq_len=SEQ_LEN + 32, streams=strategy.streams(VOCAB), depth=depth,
                       head_options=heads)


def padded(grid: Grid, length: int = SEQ_LEN) -> Grid:
    """`grid` followed by `<pad>` steps of weight 0, `length` steps in all."""
    k, t = grid.tokens.shape
    assert t <= length, f"a layout of {t} steps does not fit in {length}"
    tokens = np.full((k, length), VOCAB.pad_id, np.int32)
    weights = np.zeros((k, length), np.float32)
    tokens[:, :t], weights[:, :t] = grid.tokens, grid.weights
    return Grid(tokens, weights)


class InMemorySource:
    """A TokenSource cycling through fixed grids, `batch_size` rows per batch."""

    def __init__(self, grids: list[Grid], batch_size: int):
        self.tokens = np.stack([g.tokens for g in grids])
        self.weights = np.stack([g.weights for g in grids])
        self.batch_size, self.position = batch_size, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = (self.position + np.arange(self.batch_size)) % len(self.tokens)
        self.position = int(rows[-1] + 1) % len(self.tokens)
        return {"tokens": self.tokens[rows], "weights": self.weights[rows]}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


def loss_floor(grids: list[Grid]) -> float:
    """The least mean weighted loss any model can reach on a batch of these grids: a target is
    unpredictable only where dialogues share everything before it (all streams) and differ on
    it, e.g. interleaved weights its prompt, whose first unit after `<bos> [Speech]` is one of
    three. Depth streams also see coarser codebooks of their own step, so this bounds from above."""
    tokens, weights = np.stack([g.tokens for g in grids]), np.stack([g.weights for g in grids])
    total = 0.0
    for t in range(1, tokens.shape[2]):
        groups: dict[bytes, list[int]] = {}
        for i in range(len(grids)):
            groups.setdefault(tokens[i, :, :t].tobytes(), []).append(i)
        for rows in groups.values():
            for k in range(tokens.shape[1]):
                w, x = weights[rows, k, t], tokens[rows, k, t]
                mass = {v: w[x == v].sum() for v in set(x.tolist())}
                total -= sum(wi * np.log(mass[xi] / w.sum()) for wi, xi in zip(w, x) if wi > 0)
    return float(total / weights[:, :, 1:].sum())


@dataclasses.dataclass
class Trained:
    case: Case
    model: SpeechLM
    losses: list[float]
    floor: float  # the least loss reachable on the training batch
    layouts: list[Grid]  # unpadded, one per dialogue
    prompts: np.ndarray  # [B, K, P]
    sampled: Sampled  # greedy replies to `prompts`
    max_steps: int

    def reply(self, row: int) -> np.ndarray:
        """The layout's reply columns the sampler must produce for dialogue `row`."""
        p = self.prompts.shape[2]
        return self.layouts[row].tokens[:, p:self.layouts[row].tokens.shape[1] - self.case.trailing]


def overfit(case: Case, mesh) -> Trained:
    """Train on the dialogues until they are memorised, then sample every reply greedily."""
    layouts = [case.layout(d) for d in DIALOGUES]
    config = Config(
        seed=0, vocab=VocabConfig(**VOCAB_SIZES), model=model_config(case.strategy),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=10, weight_decay=0.0),
        data=DataConfig(batch_size=len(DIALOGUES), seq_len=SEQ_LEN),
        train=TrainConfig(steps=STEPS, log_every=STEPS),
    )
    grids = [padded(g) for g in layouts]
    source = InMemorySource(grids, len(DIALOGUES))
    result = train(config, vocab=VOCAB, source=source, mesh=mesh, progress=False)
    model = result.plan.model(result.state.params)
    prompts = np.stack([case.prompt(d).tokens for d in DIALOGUES])
    k = prompts.shape[1]
    max_steps = max(g.tokens.shape[1] for g in layouts) - prompts.shape[2] + 4
    sampler = Sampler(model, case.strategy.policy(VOCAB), VOCAB, sampling=(GREEDY,) * k,
                      max_steps=max_steps)
    sampled = jax.device_get(sampler(prompts, jax.random.key(0)))
    losses = [h["loss"] for h in result.history]
    return Trained(case, model, losses, loss_floor(grids), layouts, prompts, sampled, max_steps)


@pytest.fixture(scope="module")
def trained():
    """Trained models by strategy name, each trained once for the whole module."""
    cache: dict[str, Trained] = {}
    mesh = one_device_mesh()

    def get(name: str) -> Trained:
        if name not in cache:
            cache[name] = overfit(CASES[name], mesh)
        return cache[name]

    return get


# --- 1 + 4. overfit, greedy reproduction, read-back ---------------------------------------------

@pytest.mark.parametrize("name", [*FOUR, "text_driven", "word_by_word"])
def test_overfit_model_reproduces_every_reply_greedily(name, trained):
    run = trained(name)
    case = run.case
    assert run.losses[0] > 1.0, "an untrained model should not already know the dialogues"
    assert run.losses[-1] < run.floor + LOSS_MARGIN, (
        f"{name}: final loss {run.losses[-1]:.4f}, the data's floor {run.floor:.4f}")
    prompts = run.prompts
    for row, d in enumerate(DIALOGUES):
        layout = run.layouts[row]
        # the layout starts with the prompt and reads back to the dialogue's views
        np.testing.assert_array_equal(layout.tokens[:, :prompts.shape[2]], prompts[row])
        assert_segments(case.strategy.unlayout(layout, VOCAB), case.read_back(d), f"{name} layout")
        # the sampler stops exactly where the reply ends, having sampled exactly the reply
        want = run.reply(row)
        length = int(run.sampled.length[row])
        assert length == want.shape[1] < run.max_steps, (
            f"{name} dialogue {row}: sampled {length} steps, the reply has {want.shape[1]}")
        got = np.asarray(run.sampled.tokens[row])
        np.testing.assert_array_equal(got[:, :length], want, err_msg=f"{name} dialogue {row}")
        # a row that finishes first emits its streams' fill while the others run on
        ran = int(np.max(run.sampled.length))
        assert np.all(got[:, length:ran] == fills(case)[:, None]), f"{name} dialogue {row}: fill"
        # and the prompt plus the sampled reply read back to the dialogue, the answer included
        full = np.concatenate([prompts[row], got[:, :length]], axis=1)
        back = case.strategy.unlayout(Grid(full, np.zeros(full.shape, np.float32)), VOCAB)
        assert_segments(back, case.read_back(d), f"{name} dialogue {row} sampled")


def test_sampled_tokens_after_every_row_finished_are_fill(trained):
    """`Sampled.tokens` promises fill after the end, also past the last row's end."""
    run = trained("parallel")  # its text stream's fill is <text_pad>, not <pad> (id 0)
    ran = int(np.max(run.sampled.length))
    assert ran < run.max_steps
    tail = np.asarray(run.sampled.tokens)[:, :, ran:]
    np.testing.assert_array_equal(tail, np.broadcast_to(fills(run.case)[None, :, None], tail.shape))


# --- 2. the cached sampler equals recomputing everything -------------------------------------

@pytest.mark.parametrize("name", [*FOUR, "word_by_word"])
def test_cached_sampler_equals_recompute_reference_on_random_weights(name):
    case = CASES[name]
    model = SpeechLM(model_config(case.strategy), VOCAB, nnx.Rngs(1))
    policy, steps = case.strategy.policy(VOCAB), 14
    prompt = case.prompt(DIALOGUES[0]).tokens
    sampler = Sampler(model, policy, VOCAB, sampling=(GREEDY,) * prompt.shape[0], max_steps=steps)
    out = jax.device_get(sampler(prompt[None], jax.random.key(0)))
    want = reference_greedy(model, policy, prompt, steps)
    assert len(set(want[0].tolist())) >= 5, "a degenerate reply is a weak comparison; change seed"
    assert int(out.length[0]) == want.shape[1]
    np.testing.assert_array_equal(np.asarray(out.tokens[0])[:, :want.shape[1]], want)


@pytest.mark.parametrize("name", ["chain_of_modality", "coarse_to_fine"])
def test_cached_sampler_equals_recompute_reference_on_trained_model(name, trained):
    """The same on a model that has memorised long replies (depth decoder included)."""
    run = trained(name)
    policy = run.case.strategy.policy(VOCAB)
    want = reference_greedy(run.model, policy, run.prompts[0], run.max_steps)
    np.testing.assert_array_equal(np.asarray(run.sampled.tokens[0])[:, :want.shape[1]], want)
    assert want.shape[1] == int(run.sampled.length[0])


# --- 3. steps to first audio -------------------------------------------------------------

def first_unit_step(reply: np.ndarray) -> int:
    """The first reply step by which every speech stream has emitted audio (units or codes)."""
    kinds = np.vectorize(lambda t: VOCAB.range_of(int(t)).kind)(reply)
    speech = [k for k in range(reply.shape[0]) if np.isin(kinds[k], ("units", "acoustic")).any()]
    spoken = np.logical_and.reduce([np.cumsum(np.isin(kinds[k], ("units", "acoustic"))) > 0
                                    for k in speech])
    return int(np.argmax(spoken))


# Reply steps sampled before the first audio, as each layout predicts it for a dialogue.
FIRST_AUDIO = {
    "interleaved": lambda d: 1 + len(d.assistant.text) + 1,  # [Text] {answer} [Speech]
    "chain_of_modality": lambda d: len(d.user.text) + 1 + len(d.assistant.text) + 2,  # {transcript}
    # [ta] {answer} [ua] <sosp>
    "parallel": lambda d: CASES["parallel"].strategy.steps_to_first_audio(VOCAB),  # max delay: 2
    "coarse_to_fine": lambda d: CASES["coarse_to_fine"].strategy.steps_to_first_audio(),  # 1
    "word_by_word": lambda d: int(d.assistant.word_ends[0]) + 1,  # {first word} <sosp>
}


@pytest.mark.parametrize("name", [*FOUR, "word_by_word"])
def test_sampled_steps_to_first_audio_are_what_the_layout_predicts(name, trained):
    run = trained(name)
    for row, d in enumerate(DIALOGUES):
        measured = int(run.sampled.first_audio[row])
        assert measured == FIRST_AUDIO[name](d) == first_unit_step(run.reply(row)), (name, row)


def test_parallel_and_coarse_to_fine_speak_before_chain_of_modality(trained):
    chain, parallel, coarse = (trained(n).sampled.first_audio
                               for n in ("chain_of_modality", "parallel", "coarse_to_fine"))
    np.testing.assert_array_equal(chain, [9, 10, 9])  # 3 transcript pieces, 3/4/3 answer pieces
    np.testing.assert_array_equal(parallel, [2, 2, 2])
    np.testing.assert_array_equal(coarse, [1, 1, 1])
    assert np.all(parallel < chain) and np.all(coarse < chain)


# --- 4. a fifth strategy lives entirely in its own module ------------------------------------

def test_fifth_strategy_needs_nothing_outside_its_module():
    """WordByWord imports only public strategy pieces, and nothing in slm/ refers to it: it
    trains and samples (test above) through the unchanged model, trainer and sampler."""
    module = REPO / "tests" / "word_by_word.py"
    imported = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    slm_imports = {m for m in imported if m.split(".")[0] == "slm"}
    public = {"slm.strategies.base", "slm.strategies.policy", "slm.types", "slm.config",
              "slm.vocab"}
    assert slm_imports <= public, slm_imports - public
    mentions = [p for p in (REPO / "slm").rglob("*.py")
                if "tests.word_by_word" in p.read_text() or "WordByWord" in p.read_text()]
    assert not mentions, f"slm/ should not know the test strategy: {mentions}"
    # it has every member of the Strategy protocol, whatever the protocol grows to
    methods = {m for m, v in vars(Strategy).items() if not m.startswith("_") and callable(v)}
    assert {"streams", "layout", "unlayout", "prompt", "policy"} <= methods
    assert all(callable(getattr(WordByWord, m, None)) for m in methods)
    assert all(hasattr(WordByWord, a) for a in Strategy.__annotations__), Strategy.__annotations__


def test_word_by_word_template_and_weights():
    d = DIALOGUES[0]
    strategy = WordByWord(unit_rate=RATE)
    grid = strategy.layout([Segment("user", "text", text=d.user.text), d.assistant], VOCAB)
    r = VOCAB.render
    words = np.split(d.assistant.text, d.assistant.word_ends[:-1])
    # answer 0: lead frame + 3 frames for word 0 (2 pieces), 2 frames for word 1 (1 piece)
    units = np.split(d.assistant.units, [4])
    expected = (f"<bos> [Human] {r(d.user.text)} <eoh> [Assistant] "
                f"{r(words[0])} <sosp> {r(units[0])} <eosp> "
                f"{r(words[1])} <sosp> {r(units[1])} <eosp> <eos>")
    assert r(grid.tokens[0]).split() == expected.split()
    prompt_len = 4 + len(d.user.text)
    assert np.all(grid.weights[0, :prompt_len] == 0) and np.all(grid.weights[0, prompt_len:] == 1)


@st.composite
def word_by_word_dialogue(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    turns = []
    for _ in range(draw(st.integers(1, 3))):
        words = draw(st.integers(1, 4))
        pieces = [draw(st.integers(1, 3)) for _ in range(words)]
        frames = [draw(st.integers(1, 4)) for _ in range(words)]
        user = spoken("user", rng, pieces, frames)
        turns += [Segment("user", "text", text=user.text),
                  spoken("assistant", rng, pieces, frames, lead=draw(st.integers(0, 2)))]
    return turns


@settings(max_examples=50, deadline=None)
@given(word_by_word_dialogue())
def test_word_by_word_round_trip_and_prompt_prefix(segments):
    strategy = WordByWord(unit_rate=RATE)
    grid = strategy.layout(segments, VOCAB)
    want = [s if s.role == "user" else dataclasses.replace(s, codes=None, word_times=None)
            for s in segments]
    assert_segments(strategy.unlayout(grid, VOCAB), want, "word_by_word round trip")
    prompt = strategy.prompt(segments[:-1], VOCAB)
    np.testing.assert_array_equal(grid.tokens[:, :prompt.tokens.shape[1]], prompt.tokens)


def test_a_registered_fifth_strategy_is_reachable_from_configs():
    """`register_strategy` is the one call a new strategy needs for configs, data and sampling."""
    from slm.config import StrategyConfig
    from slm.strategies import STRATEGIES, make_strategy, register_strategy, with_strategy_streams
    from tests.word_by_word import WordByWord

    register_strategy("word_by_word", lambda options, vocab: WordByWord())
    try:
        from slm.config import load_config

        config = load_config(None, ["strategy.name=word_by_word"])
        strategy = make_strategy(StrategyConfig(name="word_by_word"), VOCAB)
        assert isinstance(strategy, WordByWord)
        streams = with_strategy_streams(config, VOCAB).model.streams
        assert [s.name for s in streams] == [s.name for s in strategy.streams(VOCAB)]
    finally:
        STRATEGIES.unregister("word_by_word")
