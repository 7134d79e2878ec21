"""One on-device sampler for every strategy: prefill, then a `lax.while_loop` of cached steps.

Each step samples the temporal streams from the temporal decoder's heads, then the depth
streams in order from the depth decoder, under the strategy's per-stream phase machines
(`slm.strategies.policy`): allowed ids per phase, delays, fills and final phases. A head
kind that speaks from the states (`slm.model.head_kinds.SpeakingHead`) gets each text state
of the reply one step later and fills its own streams. Nothing leaves the device until the
reply is finished (or a streaming chunk is due), and every step has the same shapes, so it
compiles once.

On a mesh, parameters keep their training layout (`slm.parallel.rules`), and prefill and loop
are compiled with explicit shardings of everything they carry: rows as the batch, the KV
cache's heads as the key/value heads (`tensor`), so a model larger than one device decodes
across several, each holding the weights and cache of its own heads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slm.model import SpeechLM, to_flat, to_local
from slm.model.cache import DecodeState
from slm.model.head_kinds import SpeakingHead
from slm.parallel.rules import batch_major_shardings, tree_shardings
from slm.strategies.policy import DecodePolicy
from slm.types import Grid
from slm.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class StreamSampling:
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut


TEXT_DEFAULT = StreamSampling(temperature=0.7, top_k=25)  # Moshi's text defaults
AUDIO_DEFAULT = StreamSampling(temperature=0.8, top_k=250)  # Moshi's audio defaults
GREEDY = StreamSampling(temperature=0.0)


MIN_PROMPT_BUCKET = 16


def prompt_bucket(length: int) -> int:
    """The padded prompt length: the next power of two, at least `MIN_PROMPT_BUCKET`. Prefill
    then compiles once per bucket rather than once per prompt length, for at most twice the
    prefill work."""
    return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def left_pad(prompts: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows `[K, T_b]` -> `[B, K, bucket]` right-aligned behind "no input" (-1) tokens, and
    each row's first real slot. Right alignment puts every row's last prompt token in the
    same slot, where the reply starts."""
    rows = [np.asarray(row, np.int32) for row in prompts]
    if not rows or len({row.shape[0] for row in rows}) != 1 or min(r.shape[1] for r in rows) < 1:
        raise ValueError("prompts must be one or more non-empty [streams, time] arrays with the "
                         f"same number of streams; got shapes {[r.shape for r in rows]}")
    width = prompt_bucket(max(row.shape[1] for row in rows))
    start_b = np.array([width - row.shape[1] for row in rows], np.int32)
    padded = np.full((len(rows), rows[0].shape[0], width), -1, np.int32)
    for b, row in enumerate(rows):
        padded[b, :, start_b[b]:] = row
    return padded, start_b


def left_pad_features(grids: Sequence[Grid], width: int,
                      start_b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The prompts' speech frames `[B, width, W, D]` and mask `[B, width, W]` from each row's
    first real slot `start_b` (`left_pad`'s); None when no prompt has any."""
    shapes = {g.features.shape[1:] for g in grids if g.features is not None}
    if not shapes:
        return None
    if len(shapes) > 1:
        raise ValueError(f"prompts carry speech frames of different shapes {sorted(shapes)}")
    frames = np.zeros((len(grids), width, *shapes.pop()), np.float32)
    mask = np.zeros(frames.shape[:3], bool)
    for b, grid in enumerate(grids):
        if grid.features is not None:
            frames[b, start_b[b]:], mask[b, start_b[b]:] = grid.features, grid.feature_mask
    return frames, mask


@struct.dataclass
class Sampled:
    """Reply tokens `[B, K, max_steps]` (fill after the end) and per-row step counts."""

    tokens: jax.Array
    length: jax.Array  # reply steps until every stream was final (max_steps if never)
    sampled: jax.Array  # bool [B, K, max_steps]: drawn from the model, not a fill its rule forced
    first_text: jax.Array  # first reply step with a text token (-1: none)
    first_audio: jax.Array  # first step by which every speech stream has emitted audio (-1: none)


@struct.dataclass
class _Loop:
    state: DecodeState  # per-layer caches
    layers: tuple  # per-layer temporal weights, split once per reply (see SpeechLM.decode)
    h_bd: jax.Array
    logits: tuple
    tokens: jax.Array
    sampled: jax.Array  # [B, K, steps]
    phase: jax.Array  # [B, K]
    seen_audio: jax.Array  # [B, K]
    wrote_text: jax.Array  # [B]: the last step wrote text, so its state (h_bd) is spoken
    heads: dict  # per speaking head kind, its decode carry
    first_text: jax.Array
    first_audio: jax.Array
    length: jax.Array
    step: jax.Array
    key: jax.Array


def sample_logits(key: jax.Array, logits_bv: jax.Array, allowed_bv: jax.Array,
                  how: StreamSampling) -> jax.Array:
    """Local ids `[B]` from masked logits: greedy at temperature 0, else top-k/top-p sampling."""
    logits_bv = jnp.where(allowed_bv, logits_bv.astype(jnp.float32), -jnp.inf)
    if how.temperature <= 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / how.temperature
    if 0 < how.top_k < logits_bv.shape[-1]:
        kth = lax.top_k(logits_bv, how.top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    if how.top_p < 1.0:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        mass_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
        cut = jnp.take_along_axis(sorted_bv, jnp.sum(mass_bv < how.top_p, -1, keepdims=True), -1)
        logits_bv = jnp.where(logits_bv < cut, -jnp.inf, logits_bv)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


class Sampler:
    """Compiles the prefill + loop for one model, one policy and one set of sampling settings.

    The settings are compiled into the loop, so they are fixed at construction: make another
    Sampler (it shares the model's parameters) to sample differently. With a `mesh`, the
    parameters are laid out on it and each prompt shape compiles a prefill and loop with
    explicit shardings (see the module's docstring).
    """

    def __init__(self, model: SpeechLM, policy: DecodePolicy, vocab: Vocab,
                 sampling: tuple[StreamSampling, ...] | None = None, max_steps: int = 256,
                 cfg_scale: float = 1.0, mesh: Mesh | None = None):
        streams = model.streams
        if len(policy.rules) != len(streams):
            raise ValueError(f"policy has {len(policy.rules)} stream rules, model has {len(streams)}")
        self.graphdef, state = nnx.split(model)
        self.params = nnx.to_pure_dict(state)  # plain dicts, as a train state's parameters
        self.streams, self.rules, self.max_steps = streams, policy.rules, max_steps
        kinds = [self._kind(s, vocab) for s in streams]
        self.audio_masks = tuple(k[0] for k in kinds)
        self.text_masks = tuple(k[1] for k in kinds)
        self.speech = np.array([m.any() for m in self.audio_masks])
        self.speaking = {kind: ks for kind, ks in model.head_kind_index.items()
                         if isinstance(model.head_kinds[kind], SpeakingHead)}
        self.sampling = sampling or tuple(AUDIO_DEFAULT if s else TEXT_DEFAULT for s in self.speech)
        self.cfg_scale = cfg_scale
        self.specials = vocab.range("specials")
        self.mesh = mesh
        if mesh is None:
            self._start = jax.jit(self._prefill, static_argnames=("steps",))
            self._advance = jax.jit(self._loop, donate_argnums=(1,))
        else:
            self._lay_out(model, state, mesh)

    @staticmethod
    def _kind(stream, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
        """Local masks of a stream's audio ids (units, codes) and text ids."""
        flat = np.concatenate([np.arange(a, b) for a, b in stream.spans])
        kind = np.array([vocab.range_of(int(i)).kind for i in flat])
        return np.isin(kind, ("units", "acoustic")), kind == "text"

    def __call__(self, prompts: np.ndarray | Sequence[np.ndarray] | Sequence[Grid], key: jax.Array,
                 steps: int | None = None) -> Sampled:
        """Sample a whole reply for each prompt row (see `start` for `prompts`)."""
        steps = steps or self.max_steps
        return self.result(self.advance(self.start(prompts, key, steps), steps))

    def start(self, prompts: np.ndarray | Sequence[np.ndarray] | Sequence[Grid], key: jax.Array,
              steps: int | None = None) -> "_Loop":
        """Prefill the prompts; the returned loop state holds room for `steps` reply steps.

        `prompts` is `[B, K, T]`, or one `[K, T_b]` array per row when their lengths differ,
        or one `Grid` per row (which may carry the user's speech frames, prefilled with it).
        Rows are left-padded to a bucket length (`prompt_bucket`), so a new question of a
        similar length reuses the compiled prefill instead of compiling its own.

        With classifier-free guidance (`cfg_scale != 1`) a second copy of every row runs with
        the prompt's content removed (text, units, codes and speech frames become "no input",
        markers stay), and each step samples from `uncond + cfg_scale * (cond - uncond)`.
        """
        grids = [p for p in prompts if isinstance(p, Grid)]
        prompt_bkt, start_b = left_pad([g.tokens for g in grids] if grids else prompts)
        features = left_pad_features(grids, prompt_bkt.shape[2], start_b)
        prompt_bkt, start_b = jnp.asarray(prompt_bkt), jnp.asarray(start_b)
        if self.guided:
            content = prompt_bkt >= self.specials.stop
            prompt_bkt = jnp.concatenate([prompt_bkt, jnp.where(content, -1, prompt_bkt)])
            start_b = jnp.concatenate([start_b, start_b])
            if features is not None:
                features = tuple(np.concatenate([x, np.zeros_like(x)]) for x in features)
        steps = steps or self.max_steps
        if self.mesh is None:
            return self._start(self.params, prompt_bkt, start_b, key, features, steps=steps)
        args = (prompt_bkt, start_b, key, features)
        return self._sharded_prefill(args, steps)(self.params, *args)

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def advance(self, loop: "_Loop", until: int) -> "_Loop":
        """Run reply steps on device until step `until` or until every row is finished.

        Streaming calls this chunk by chunk; one compiled loop serves every chunk size.
        """
        until = jnp.asarray(until, jnp.int32)
        if self.mesh is None:
            return self._advance(self.params, loop, until)
        return self._loops[self._loop_key(loop)](self.params, loop, until)

    # -- on a mesh ----------------------------------------------------------------------------
    def _lay_out(self, model: SpeechLM, state, mesh: Mesh):
        """Parameters onto `mesh` by their logical axes; prefill and loop compile per shape."""
        names = nnx.to_pure_dict(nnx.get_partition_spec(state))
        self.param_shardings = tree_shardings(names, self.params, mesh)
        self.params = jax.device_put(self.params, self.param_shardings)
        stacked = nnx.get_partition_spec(nnx.state(model.decoder.layers))
        self._layer_names = jax.tree.map(lambda p: PartitionSpec(*p[1:]), stacked,
                                         is_leaf=lambda x: isinstance(x, PartitionSpec))
        self._prefills: dict = {}  # per prompt shape and reply length
        self._loops: dict = {}  # per loop shape

    def _sharded_prefill(self, args: tuple, steps: int):
        """The prefill for these prompt arrays, compiled with explicit shardings; it also
        compiles the loop for the state it returns."""
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
        key = (tuple(jax.tree.leaves(shapes)), steps)
        if key not in self._prefills:
            prefill = self._on_mesh(functools.partial(self._prefill, steps=steps))
            loop_shapes = jax.eval_shape(prefill, self.params, *shapes)
            carried = self._loop_shardings(loop_shapes)
            replicated = NamedSharding(self.mesh, PartitionSpec())
            self._loops[self._loop_key(loop_shapes)] = jax.jit(
                self._on_mesh(self._loop), donate_argnums=(1,),
                in_shardings=(self.param_shardings, carried, replicated), out_shardings=carried)
            inputs = batch_major_shardings(shapes, self.mesh)
            self._prefills[key] = jax.jit(prefill, in_shardings=(self.param_shardings, *inputs),
                                          out_shardings=carried)
        return self._prefills[key]

    @staticmethod
    def _loop_key(loop: "_Loop") -> tuple:
        return loop.state.start.shape[0], loop.state.capacity, loop.tokens.shape[2]

    def _on_mesh(self, fn):
        """`fn` traced under this mesh, so the model's layout constraints and its choice of
        attention kernel see it."""
        @functools.wraps(fn)
        def traced(*args):
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                return fn(*args)
        return traced

    def _loop_shardings(self, loop: "_Loop") -> "_Loop":
        """Where each carried array lives: rows split as the batch, the KV caches by their
        logical axes, the per-layer weights as the stacked ones they were cut from."""
        by_rows = batch_major_shardings(loop, self.mesh)
        cache = loop.state.cache
        return by_rows.replace(
            state=by_rows.state.replace(
                cache=tree_shardings(tuple(c.axes() for c in cache), cache, self.mesh)),
            layers=tree_shardings((self._layer_names,) * len(loop.layers), loop.layers, self.mesh))

    @staticmethod
    def result(loop: "_Loop") -> Sampled:
        return Sampled(loop.tokens, loop.length, loop.sampled, loop.first_text, loop.first_audio)

    @staticmethod
    def finished(loop: "_Loop") -> bool:
        return bool(jnp.all(loop.length < loop.tokens.shape[2]) | (loop.step >= loop.tokens.shape[2]))

    # -- on device ----------------------------------------------------------------------------
    def _prefill(self, params, prompt_bkt, start_b, key, features, steps: int) -> "_Loop":
        model = nnx.merge(self.graphdef, params)
        rows, k, p = prompt_bkt.shape
        b = rows // 2 if self.guided else rows
        layers = model.decoder.split_layers()
        state = model.init_decode_state(rows, p + steps, per_layer=True, start_b=start_b)
        h_btd, logits, state = model.decode(prompt_bkt, state, layers, features)
        start = jnp.array([r.start for r in self.rules], jnp.int32)
        init = _Loop(
            state=state, layers=layers, h_bd=h_btd[:, -1],
            logits=tuple(lg[:, -1] for lg in logits),
            tokens=jnp.broadcast_to(jnp.array([r.fill for r in self.rules], jnp.int32)[None, :, None],
                                    (b, k, steps)),
            sampled=jnp.zeros((b, k, steps), bool),
            phase=jnp.broadcast_to(start, (b, k)),
            seen_audio=jnp.broadcast_to(jnp.asarray(~self.speech), (b, k)),
            wrote_text=jnp.zeros((b,), bool),
            heads={kind: model.head_kinds[kind].decode_init(b, steps) for kind in self.speaking},
            first_text=jnp.full((b,), -1, jnp.int32), first_audio=jnp.full((b,), -1, jnp.int32),
            length=jnp.full((b,), steps, jnp.int32), step=jnp.zeros((), jnp.int32), key=key,
        )
        return init

    def _loop(self, params, loop: "_Loop", until: jax.Array) -> "_Loop":
        model = nnx.merge(self.graphdef, params)
        steps = loop.tokens.shape[2]
        body = functools.partial(self._step, model)

        def running(s: _Loop) -> jax.Array:
            return (s.step < jnp.minimum(until, steps)) & ~jnp.all(s.length < steps)

        loop = lax.while_loop(running, body, loop)
        return loop.replace(tokens=self._spoken(model, loop))

    def _spoken(self, model: SpeechLM, loop: "_Loop") -> jax.Array:
        """`loop.tokens` with what each speaking head decoded so far in its streams."""
        tokens = loop.tokens
        for kind, ks in self.speaking.items():
            ids_bkt = model.head_kinds[kind].decoded(loop.heads[kind], tokens.shape[2])
            fills = jnp.array([self.rules[k].fill for k in ks], jnp.int32)[None, :, None]
            tokens = tokens.at[:, np.array(ks)].set(jnp.where(ids_bkt >= 0, ids_bkt, fills))
        return tokens

    def _pick(self, k: int, logits_bv, phase_b, step,
              key) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Token (flat id) of stream k, its next phase, and whether the token was drawn (not a
        fill forced by the delay or a final phase), honouring delay, fill and finality."""
        rule, spans = self.rules[k], self.streams[k].spans
        allowed = jnp.asarray(rule.allowed)[phase_b]
        local = sample_logits(key, logits_bv, allowed, self.sampling[k])
        waiting = step < rule.delay
        done = jnp.asarray(rule.final)[phase_b]
        token = jnp.where(waiting | done, rule.fill, to_flat(local, spans))
        next_phase = jnp.where(waiting, phase_b, jnp.asarray(rule.next_phase)[phase_b, local])
        return token, jnp.where(done, phase_b, next_phase), ~(waiting | done)

    def _guide(self, logits: jax.Array) -> jax.Array:
        """Rows [cond; uncond] -> guided logits for the conditional rows."""
        if not self.guided:
            return logits
        cond, uncond = jnp.split(logits.astype(jnp.float32), 2)
        return uncond + self.cfg_scale * (cond - uncond)

    def _both(self, x: jax.Array) -> jax.Array:
        """The sampled tokens feed both the conditional and the unconditional rows."""
        return jnp.concatenate([x, x]) if self.guided else x

    def _step(self, model: SpeechLM, s: _Loop) -> _Loop:
        keys = jax.random.split(s.key, len(self.streams) + 1)
        column = [None] * len(self.streams)
        phase = [None] * len(self.streams)
        drawn = [None] * len(self.streams)
        for i, k in enumerate(model.temporal_index):
            column[k], phase[k], drawn[k] = self._pick(k, self._guide(s.logits[i]), s.phase[:, k],
                                                       s.step, keys[k])
        if model.depth is not None:
            cache = model.depth.init_cache(s.h_bd.shape[0])
            prev = column[model.depth_cond_index]
            for q, k in enumerate(model.depth_index):
                logits_bc, cache = model.depth.step(s.h_bd, self._both(prev), q, cache)
                column[k], phase[k], drawn[k] = self._pick(k, self._guide(logits_bc), s.phase[:, k],
                                                           s.step, keys[k])
                prev = column[k]
        for ks in model.head_kind_index.values():  # plug-in heads sample no tokens: fill
            for k in ks:
                column[k] = jnp.full(s.phase.shape[:1], self.rules[k].fill, jnp.int32)
                phase[k], drawn[k] = s.phase[:, k], jnp.zeros(s.phase.shape[:1], bool)
        heads, spoken = {}, []
        for kind, ks in self.speaking.items():  # the state of the step before, if it wrote text
            heads[kind], audio_b = model.head_kinds[kind].decode_step(
                s.heads[kind], s.h_bd[:s.phase.shape[0]], s.wrote_text)
            spoken.append((ks, audio_b))
        column_bk, phase_bk = jnp.stack(column, axis=1), jnp.stack(phase, axis=1)
        running = s.length == s.tokens.shape[2]  # rows not finished before this step
        drawn_bk = jnp.stack(drawn, axis=1) & running[:, None]
        fills = jnp.array([r.fill for r in self.rules], jnp.int32)
        column_bk = jnp.where(running[:, None], column_bk, fills[None, :])
        final_bk = jnp.stack([jnp.asarray(r.final)[phase_bk[:, k]] for k, r in enumerate(self.rules)], 1)
        is_audio = self._member(column_bk, self.audio_masks)
        is_text = self._member(column_bk, self.text_masks)
        for ks, audio_b in spoken:  # a head's streams have spoken once it emitted a unit
            is_audio = is_audio.at[:, np.array(ks)].set(audio_b[:, None])
        seen = s.seen_audio | is_audio
        first_audio = jnp.where((s.first_audio < 0) & jnp.all(seen, 1) & running, s.step, s.first_audio)
        first_text = jnp.where((s.first_text < 0) & jnp.any(is_text, 1) & running, s.step, s.first_text)
        length = jnp.where(running & jnp.all(final_bk, 1), s.step + 1, s.length)
        h_btd, logits, state = model.decode(self._both(column_bk)[:, :, None], s.state, s.layers)
        return _Loop(
            state=state, layers=s.layers, h_bd=h_btd[:, -1],
            logits=tuple(lg[:, -1] for lg in logits),
            tokens=lax.dynamic_update_slice_in_dim(s.tokens, column_bk[:, :, None], s.step, axis=2),
            sampled=lax.dynamic_update_slice_in_dim(s.sampled, drawn_bk[:, :, None], s.step, axis=2),
            phase=phase_bk, seen_audio=seen, wrote_text=jnp.any(is_text, 1) & running,
            heads=heads, first_text=first_text,
            first_audio=first_audio, length=length, step=s.step + 1, key=keys[-1],
        )

    def _member(self, column_bk: jax.Array, masks: tuple[np.ndarray, ...]) -> jax.Array:
        """Whether each stream's token is in its mask (masks are in local head order)."""
        hits = []
        for k, (stream, mask) in enumerate(zip(self.streams, masks)):
            local = to_local(column_bk[:, k], stream.spans)
            hits.append((local >= 0) & jnp.asarray(mask)[jnp.maximum(local, 0)])
        return jnp.stack(hits, axis=1)
