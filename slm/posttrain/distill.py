"""On-policy distillation: the student answers the spoken question, a teacher reads the
transcript and scores every token of the student's own reply (Agarwal et al., arXiv
2306.13649; the speech-summarization recipe's KD stage, which shrinks the modality gap).

The teacher is any slm checkpoint (`posttrain.kd.teacher`), typically the text model the
student started from. Both see the same reply: the student after its spoken prompt, the
teacher after the written question laid out by its own strategy. The two vocabularies meet
where they agree: specials by name, and ranges of the same name and size (the text range
above all) by position; the KL is taken per shared stream (by name) over those ids, each
side renormalised over them, at every reply token the student drew.

tunix's distillation (google/tunix, tunix/distillation: `DistillationTrainer` with a logit
strategy) was read for the loss, KL(softmax(teacher) || softmax(student)); it does not fit:
it distils on fixed training inputs (off-policy), feeds teacher and student the same `[B, T]`
token row, assumes one shared vocabulary, and has no sampler in the loop. Here the inputs are
the student's rollouts, the teacher's prompt differs from the student's (text vs speech), the
grids have K streams with their own heads, and the vocabularies differ (the student's has
units and codes). The package also pins transformers 5.12.1, below slm's 5.24.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slm.data.tokenizers import instruction_tokenizer
from slm.errors import ConfigError, VocabError
from slm.model import to_local
from slm.posttrain.method import MethodSetup, register_method
from slm.posttrain.prompts import Prompt
from slm.posttrain.rollout import model_inputs
from slm.sample import left_pad
from slm.strategies import make_strategy
from slm.train.checkpoint import read_saved, restore_params
from slm.train.optim import make_optimizer
from slm.train.state import plan_state
from slm.types import StreamSpec, build_streams
from slm.vocab import Vocab

DIVERGENCES = ("forward", "reverse")
TOKEN_HEADS = ("temporal", "depth")


def token_kl(student_logp: jax.Array, teacher_logp: jax.Array, divergence: str) -> jax.Array:
    """Per-position KL over the last axis: "forward" KL(teacher || student) covers every
    answer the teacher would give (mass-covering); "reverse" KL(student || teacher) keeps the
    student on what the teacher rates highly (mode-seeking)."""
    if divergence == "forward":
        return jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)
    return jnp.sum(jnp.exp(student_logp) * (student_logp - teacher_logp), axis=-1)


def shared_ids(student: Vocab, teacher: Vocab, where: str) -> np.ndarray:
    """`[student.size]`: each student id's teacher id, -1 where the teacher has none."""
    if student.text_pieces and teacher.text_pieces and student.text_pieces != teacher.text_pieces:
        raise VocabError(f"{where}: the teacher's text pieces differ from the student's; "
                         "distil from a teacher with the student's text tokenizer")
    out = np.full(student.size, -1, np.int32)
    for name in student.specials:
        if name in teacher.specials:
            out[student.special(name)] = teacher.special(name)
    for r in student.ranges:
        if r.kind not in ("special", "reserved") and teacher.has_range(r.name) \
                and teacher.range(r.name).size == r.size:
            out[r.start:r.stop] = np.arange(teacher.range(r.name).start, teacher.range(r.name).stop)
    return out


def _local(ids: np.ndarray, spans) -> np.ndarray:
    return np.asarray(to_local(jnp.asarray(ids), spans))


def _flat(stream: StreamSpec) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in stream.spans])


def shared_heads(student: tuple[StreamSpec, ...], teacher: tuple[StreamSpec, ...],
                 ids: np.ndarray) -> list[tuple[str, int, np.ndarray, int, np.ndarray]]:
    """(name, student stream, its local columns, teacher stream, its local columns) of every
    stream both predict token by token, columns paired id for id."""
    by_name = {s.name: k for k, s in enumerate(student)}
    heads = []
    for j, t in enumerate(teacher):
        k = by_name.get(t.name)
        if k is None or t.head not in TOKEN_HEADS or student[k].head not in TOKEN_HEADS:
            continue
        mapped = _local(ids[_flat(student[k])], t.spans)
        keep = np.flatnonzero(mapped >= 0)
        if keep.size:
            heads.append((t.name, k, keep, j, mapped[keep]))
    return heads


def _teacher_logprobs(graphdef, heads, steps: int, params, tokens, segments) -> dict:
    """The teacher's log-probs over the shared columns at the last `steps` (reply) steps."""
    model = nnx.merge(graphdef, params)
    logits = model.next_logits(model(tokens, segments))
    return {name: jax.nn.log_softmax(logits[j][:, -steps:][..., cols], axis=-1)
            for name, _, _, j, cols in heads}


class Distill:
    """`slm posttrain kd`."""

    def __init__(self, setup: MethodSetup):
        config, vocab = setup.config, setup.vocab
        cfg = config.posttrain.kd
        if not cfg.teacher:
            raise ConfigError("slm posttrain kd needs posttrain.kd.teacher: the checkpoint "
                              "directory of the model that reads the transcript")
        if cfg.divergence not in DIVERGENCES:
            raise ConfigError(f"posttrain.kd.divergence={cfg.divergence!r}; choose one of "
                              f"{DIVERGENCES}")
        where = f"posttrain.kd.teacher={cfg.teacher}"
        streams, rollout = setup.streams, setup.rollout
        t_config, self.t_vocab, _ = read_saved(cfg.teacher)
        t_plan = plan_state(t_config, self.t_vocab, setup.mesh,
                            make_optimizer(t_config.optim, t_config.train.steps))
        self.teacher = restore_params(cfg.teacher, t_plan, self.t_vocab)
        self.t_strategy = make_strategy(t_config.strategy, self.t_vocab,
                                        text=instruction_tokenizer(t_config))
        t_streams = build_streams(t_config.model, self.t_vocab)
        self.ids = jnp.asarray(shared_ids(vocab, self.t_vocab, where))
        self.heads = shared_heads(streams, t_streams, np.asarray(self.ids))
        if not self.heads:
            raise ConfigError(f"{where}: no stream of the teacher ({[s.name for s in t_streams]}) "
                              f"shares a name and vocabulary with the student's "
                              f"({[s.name for s in streams]}); nothing to distil")
        by_name = {s.name: k for k, s in enumerate(streams)}
        self.rows = [by_name.get(s.name, -1) for s in t_streams]  # student row of each
        self.divergence, self.steps = cfg.divergence, rollout.steps
        self.rollout, self.prompts, self.scorer = rollout, setup.prompts, setup.scorer
        self.replies_per_step = config.posttrain.prompts
        self._teacher_logp = jax.jit(functools.partial(_teacher_logprobs, t_plan.graphdef,
                                                       self.heads, self.steps))

    def batch(self, params, step: int, key: jax.Array) -> tuple[dict, dict]:
        prompts = self.prompts.batch(step)
        rolled = self.rollout(params, [p.grid for p in prompts], key, logprobs=False)
        scores = self.scorer([p.grid for p in prompts], rolled.replies(), [p.qa for p in prompts])
        tokens, segments = self.teacher_inputs(prompts, rolled.tokens[:, :, -self.steps:])
        teacher = self._teacher_logp(self.teacher, tokens, segments)
        batch = rolled.inputs() | {"mask": rolled.mask}
        batch |= {f"teacher/{name}": logp for name, logp in teacher.items()}
        host = scores.summary(rolled.length)
        return batch, host

    def teacher_inputs(self, prompts: list[Prompt], reply_bks: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
        """(tokens, segments) the teacher reads: each question written and laid out by its
        strategy, then the student's reply in the teacher's ids and streams."""
        written = [self.t_strategy.prompt([p.written(self.t_vocab)], self.t_vocab).tokens
                   for p in prompts]
        prompt_bkt, start_b = left_pad(written)
        mapped = jnp.where(reply_bks >= 0, self.ids[jnp.maximum(reply_bks, 0)], -1)
        none = jnp.full(mapped[:, 0].shape, -1, jnp.int32)
        reply_t = jnp.stack([mapped[:, k] if k >= 0 else none for k in self.rows], axis=1)
        tokens = jnp.concatenate([jnp.asarray(prompt_bkt), reply_t], axis=2)
        segments = jnp.asarray(np.arange(tokens.shape[2])[None] >= start_b[:, None], jnp.int32)
        return tokens, segments

    def objective(self, model, batch: dict, key: jax.Array | None = None
                  ) -> tuple[jax.Array, tuple[jax.Array, dict]]:
        logits = model.next_logits(model(*model_inputs(batch)))
        total, weight = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        for name, k, cols, _, _ in self.heads:
            student = jax.nn.log_softmax(logits[k][:, -self.steps:][..., cols], axis=-1)
            kl = token_kl(student, batch[f"teacher/{name}"], self.divergence)
            mask = batch["mask"][:, k, -self.steps:]
            total, weight = total + jnp.sum(kl * mask), weight + jnp.sum(mask)
        metrics = {"loss_sum/kd": total, "weight_sum/kd": weight,
                   "stat_sum/kl": total, "stat_weight/kl": weight}
        return total, (weight, metrics)


register_method("kd", Distill, "on-policy distillation from a teacher reading the transcript")
