"""Typed configuration: dataclasses loaded from YAML, with `a.b.c=value` overrides.

Every field is typed so that a typo or a wrong type fails at load time with the key's full
path, long before a pod-hour is spent.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from slm.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML's 1.1 rules read `1e-3` (no dot) as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """`line L, column C: <problem>` of a YAML error, without PyYAML's multi-line echo of
    the input, so a ConfigError can say where in a file or override the mistake is."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None and start.line != mark.line:
        where += f" ({context} that starts on line {start.line + 1})"
    return where


@dataclasses.dataclass
class VocabConfig:
    """Sizes of the token ranges; the vocabulary itself is built from these (see slm.vocab)."""

    text_size: int = 256
    num_units: int = 0
    num_codebooks: int = 0
    codebook_size: int = 0
    extra_specials: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CorpusConfig:
    """How much of the embedded spoken corpus to synthesize (`slm demo`, `slm corpus synth`)."""

    train_sentences: int = 300
    train_dialogues: int = 200
    heldout_sentences: int = 40
    heldout_dialogues: int = 40  # per held-out test set (closed_world.TEST_SETS)
    text_lines: int = 1000
    text_dialogues: int = 1000  # written questions and answers (text-only facts are asked here)


@dataclasses.dataclass
class TokenizersConfig:
    """How text and speech become tokens; trained once per corpus and saved in `dir`."""

    dir: str = ""  # holds tokenizers.json once trained; the vocabulary is then built from it
    text_vocab_size: int = 256
    text_model: str = "unigram"  # sentencepiece "unigram" | "bpe"
    hf_text_dir: str = ""  # a pretrained LLM's tokenizer directory instead of sentencepiece
    num_units: int = 64
    unit_features: str = "mfcc"  # "logmel" | "mfcc" (librosa) | "ctc" (a recognizer of the
    #                              corpus, slm.speech.ctc_units) | "hf" (hf_encoder_dir)
    unit_encoder_steps: int = 1000  # training steps of the "ctc" unit encoder
    unit_vocoder: str = "mean"  # units -> speech: "mean" frame per unit | "conv" (with context)
    unit_vocoder_steps: int = 800  # training steps of the "conv" unit vocoder
    unit_frame_rate: float = 50.0
    dedup_units: bool = False
    hf_encoder_dir: str = ""
    hf_encoder_layer: int = 6
    codec: str = "rvq"  # "rvq" (built in, trained here) | "hf" (Mimi / EnCodec in hf_codec_dir)
    hf_codec_dir: str = ""
    num_codebooks: int = 4
    codebook_size: int = 256
    max_seconds: float = 30.0  # longer utterances are skipped (counted) when tokenizing
    cache_features: bool = False  # keep the user's speech frames in the shards (user_input:
    #                               features), so training never recomputes them
    features: str = "states"  # what they are: the unit encoder's "states" (a frozen encoder,
    #                           run once here) or its "log_mel" inputs (model.speech_input.encoder
    #                           runs it in the model, where it can train)
    train_clips: int = 300  # utterances used to fit units and codec


@dataclasses.dataclass
class TaskFormatConfig:
    """How a prompt names its reply's task (slm.strategies.tasks), for strategies that tag
    tasks (chain_of_modality, text_driven). The default changes nothing: one slm tag."""

    style: str = "tag"  # "tag": <|transcribe|> / <|tts|>; "qwen_audio": Qwen-Audio's tag sequence
    #                     (transcription/analysis, audio language, task, text language,
    #                     timestamps); "instruction": a sentence ("Transcribe the speech.")
    language: str = "en"  # the audio and text language tags of "qwen_audio"
    timestamps: bool = False  # SRWT: a transcript has a time token before and after each word
    time_step: float = 0.04  # seconds between time tokens <|0.00|>, <|0.04|>, ...
    max_time: float = 30.0  # the last time token; later word times are clamped to it


@dataclasses.dataclass
class StrategyConfig:
    """Which generation strategy lays examples out (slm.strategies), and its options.

    `options` are the strategy's own (e.g. `{speech: codes}` for parallel), checked against the
    options dataclass it registered with when the strategy is built (slm.strategies).
    """

    name: str = ""  # "" for raw token sources (e.g. synthetic); else a registered strategy
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    dedup_input_units: bool = True  # de-duplicate the user's units (SpeechGPT, SpiRit-LM)
    user_input: str = "units"  # hear the user's speech as "units" or encoder "features"
    #                            (projected into the model: model.speech_input)
    task_format: TaskFormatConfig = dataclasses.field(default_factory=TaskFormatConfig)


# Keys that moved, old path -> new path: a config that still uses one fails naming its new place.
MOVED_KEYS = {f"strategy.{key}": f"strategy.options.{key}" for key in
              ("force_modality", "task", "speech", "delays", "acoustic_delay", "user_codes")}


@dataclasses.dataclass
class StreamConfig:
    """One of the K parallel token streams: which vocabulary ranges it may hold, who predicts it.

    `head` is "temporal" (a head on the temporal decoder output) or "depth" (predicted in order
    by the depth decoder, one codebook per depth step).
    """

    name: str = "tokens"
    ranges: list[str] = dataclasses.field(default_factory=lambda: ["specials", "text"])
    head: str = "temporal"


@dataclasses.dataclass
class SpeechInputConfig:
    """How the model hears user speech given as encoder frames (`strategy.user_input:
    features`): a projector (slm.model.projectors) maps each grid step's frames to d_model."""

    dim: int = 0  # the frames' width; 0: no speech input, or (training) the tokenized data's
    projector: str = "stack_mlp"  # a registered projector: stack_mlp, conv_mlp, qformer
    projector_options: dict = dataclasses.field(default_factory=dict)  # its Options' fields
    encoder: str = ""  # "": the frames are encoder states already; "ctc": they are log-mels and
    #                    the model runs the corpus recognizer's encoder (slm.model.speech_encoder)
    encoder_dir: str = ""  # a trained recognizer to start the encoder from (<tokenizers>/unit_encoder)
    encoder_options: dict = dataclasses.field(default_factory=dict)  # RecognizerConfig's d, layers, heads, kernel


@dataclasses.dataclass
class DepthConfig:
    """Small transformer over the codebooks of one step (Moshi's depformer, RQ-Transformer)."""

    num_layers: int = 0  # 0 disables the depth decoder
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 4
    mlp_dim: int = 128
    cond_stream: str = ""  # stream whose token feeds depth step 0 (e.g. the semantic stream)


@dataclasses.dataclass
class LoraConfig:
    """Low-rank adapters on chosen projections (slm.model.lora); rank 0: none."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input, in training only
    # q, k, v, o, gate, up, down (temporal decoder); depth.<those>, depth.in, depth.head (depth
    # decoder); heads (the untied temporal heads)
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "k", "v", "o"])


@dataclasses.dataclass
class ModelConfig:
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4  # == num_heads: MHA; 1: MQA; in between: GQA
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_dim: int = 256
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    # Options that let pretrained families load exactly (slm convert hf); defaults are Llama's.
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + scale), scale starting at 0 (Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(d_model) before the decoder (Gemma)
    mlp_activation: str = "silu"  # gated MLP: "silu" (SwiGLU), "gelu_tanh" (GeGLU), "gelu"
    stream_combine: str = "sum"  # "sum" (Moshi, PSLM) or "mean" (Mini-Omni)
    attention: str = "auto"  # "auto": by backend (CPU blocked, GPU cudnn, TPU splash), or one
    # of "blocked" (causal query blocks), "dot_product" (XLA's), "cudnn", "splash"; see
    # slm.model.attention
    scan_layers: bool = True
    # what a layer keeps for the backward pass: "none", "full", "dots", "dots_no_batch",
    # "offload" (slm.model.decoder.REMAT_POLICIES)
    remat: str = "none"
    # compute dtype; "auto": float32 on CPU, bfloat16 on accelerators (slm.model.precision).
    # Parameters, gradients and optimizer state are kept in param_dtype.
    dtype: str = "auto"
    param_dtype: str = "float32"
    streams: list[StreamConfig] = dataclasses.field(default_factory=lambda: [StreamConfig()])
    depth: DepthConfig = dataclasses.field(default_factory=DepthConfig)
    speech_input: SpeechInputConfig = dataclasses.field(default_factory=lambda: SpeechInputConfig())
    head_options: dict = dataclasses.field(default_factory=dict)  # plug-in head kind -> options
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)


@dataclasses.dataclass
class MeshConfig:
    """Device mesh sizes per axis; -1 fills the remaining devices (at most one -1 per group)."""

    ici: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1}
    )
    dcn: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"data": 1, "fsdp": 1, "tensor": 1}
    )
    max_replicated_fraction: float = 0.02


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic" (token task) or "records" (`slm tokenize` shards)
    dir: str = ""  # records: the shards directory
    split: str = "train"  # records: "train" or "heldout"
    mixture: dict[str, float] = dataclasses.field(default_factory=lambda: {"dialogue": 1.0})
    batch_size: int = 8  # global batch per optimizer step (all microbatches, all hosts)
    seq_len: int = 64
    grad_accum: int = 1


@dataclasses.dataclass
class CheckpointConfig:
    dir: str = ""  # empty: no checkpoints
    every_steps: int = 100
    every_seconds: float = 0.0  # 0: no time policy
    keep: int = 3
    async_save: bool = True
    # A checkpoint directory (e.g. from `slm convert hf`) whose parameters start a new run; its
    # step, optimizer state and data position are not used. Ignored once `dir` holds a checkpoint.
    init_from: str = ""


@dataclasses.dataclass
class TrainConfig:
    steps: int = 200
    log_every: int = 10
    tensorboard_dir: str = ""  # empty: <checkpoint.dir>/tb if checkpointing, else none
    profile_steps: list[int] = dataclasses.field(default_factory=list)  # [first, last]: a
    #                  jax.profiler trace of those steps in the TensorBoard directory
    # What trains (slm.train.trainable): parts (all, lora, projector, encoder, heads, embeddings,
    # decoder, depth, norms) or regexes over parameter paths; the rest is frozen, with no optimizer state
    trainable: list[str] = dataclasses.field(default_factory=lambda: ["all"])


@dataclasses.dataclass
class EvalConfig:
    """Held-out loss while training (slm.train.evaluate)."""

    every_steps: int = 0  # 0: never; else every this many steps and at the last
    batches: int = 2  # fixed batches per task, drawn once
    split: str = "heldout"  # the records' split scored


@dataclasses.dataclass
class RolloutConfig:
    """How post-training samples replies from the current weights (every stream alike)."""

    max_steps: int = 32  # reply steps per rollout
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut


@dataclasses.dataclass
class DistillConfig:
    """On-policy distillation (`slm posttrain kd`): a teacher scores the student's rollouts."""

    teacher: str = ""  # checkpoint directory of the teacher, given the question as text
    divergence: str = "forward"  # "forward": KL(teacher || student); "reverse": KL(student || teacher)


@dataclasses.dataclass
class DPOConfig:
    beta: float = 0.1
    pairs: str = ""  # JSONL of offline pairs (slm.posttrain.dpo); "": pairs of the student's rollouts


@dataclasses.dataclass
class GRPOConfig:
    group: int = 4  # replies sampled per prompt
    epsilon: float = 0.2  # ratio clip
    kl_beta: float = 0.04  # weight of the k3 KL estimate to the reference
    normalize: str = "token"  # "token": mean over all reply tokens; "sequence": per reply, then mean
    iterations: int = 1  # optimizer updates per batch of rollouts (mu); > 1 makes the clip bite
    #                      (checkpoints count updates, as in `slm train`: every_steps included)


@dataclasses.dataclass
class PosttrainConfig:
    """`slm posttrain kd|dpo|grpo`: starts from `checkpoint.init_from` (also the frozen
    reference), asks the questions of `data.dir`'s spoken dialogues, runs `train.steps`."""

    prompts: int = 8  # questions per step
    split: str = "train"  # the dialogue split the questions come from
    reward: str = "answer"  # a registered rule reward (slm.posttrain.rewards)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    kd: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)


@dataclasses.dataclass
class Config:
    seed: int = 0
    vocab: VocabConfig = dataclasses.field(default_factory=VocabConfig)
    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
    tokenizers: TokenizersConfig = dataclasses.field(default_factory=TokenizersConfig)
    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    posttrain: PosttrainConfig = dataclasses.field(default_factory=PosttrainConfig)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type `hint`, building nested dataclasses; errors name `key`."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of fields, got {value!r}")
        return dataclass_from_dict(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {hint}")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and type(value) is not hint:
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def dataclass_from_dict(cls: type, data: dict, prefix: str) -> Any:
    """`cls(**data)` with every key checked against `cls`'s fields and typed; errors name the
    key's full path under `prefix`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if where in MOVED_KEYS:
            new = MOVED_KEYS[where]
            raise ConfigError(f"'{where}' moved to '{new}': a strategy's own options sit under "
                              f"strategy.options, e.g. strategy: {{name: parallel, options: "
                              f"{{speech: codes}}}}, or the override {new}=<value>")
        raise ConfigError(
            f"unknown config key '{where}'; valid keys under '{prefix or '<top>'}' are: "
            + (", ".join(sorted(names)) or "none")
        )
    kwargs = {
        k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()
    }
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=3` -> ("a.b", 3); values are parsed as YAML so lists and numbers keep their types."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=10)")
        key, raw = item.split("=", 1)
        try:
            value = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); quote "
                "the whole override so the shell passes a mapping or list as one argument, with "
                "a space after each colon, e.g. 'data.mixture={dialogue: 1.0, asr: 0.5}'"
            ) from None
        parsed.append((key.strip(), value))
    return parsed


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file whose top level is a mapping; a missing file, bad YAML (named by line and
    column) or another top level is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    try:
        data = _yaml(path.read_text("utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML at {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                patches: list[dict] = ()) -> Config:
    """Load a YAML config (or the defaults), merge nested `patches` over it in order (as an
    ablation varies one base config), then apply `key=value` overrides, strictly typed."""
    data = read_yaml_mapping(path, "config") if path is not None else {}
    return patched_config(data, overrides, patches, str(path or "config"))


def patched_config(data: dict, overrides: list[str] = (), patches: list[dict] = (),
                   where: str = "config") -> Config:
    """`load_config` over a config already read (e.g. the one a checkpoint was saved with);
    errors name `where`."""
    data = copy.deepcopy(data)  # overrides are set in place
    for patch in patches:
        data = _merged(data, patch)
    for key, value in parse_overrides(list(overrides)):
        _set_path(data, key, value)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _merged(base: dict, patch: dict) -> dict:
    """`patch` over `base`: sections merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in patch.items():
        both_sections = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_sections else value
    return out


def config_from_dict(data: dict) -> Config:
    return dataclass_from_dict(Config, data, "")


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
