"""`slm convert hf`: a local transformers checkpoint -> an slm training checkpoint.

The result is an ordinary step-0 checkpoint (params, fresh optimizer state, config and
vocabulary, via slm.train.checkpoint), so `load_model` and `slm sample` read it like any other.
Beside it: `vocab.json`, `config.yaml`, and `hf/` with the source's config.json and tokenizer
files, which `slm convert to-hf` needs to write a loadable HF model back. Nothing is fetched
from the network, no remote code runs, and no pickle is read (see slm.convert.tensors).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

from slm.config import CheckpointConfig, Config, LoraConfig, config_to_dict, load_config
from slm.convert.hf_config import HFModel, hf_model, read_config_json
from slm.convert.shard_reader import LoadStats
from slm.convert.sharded import load_params
from slm.convert.tensors import TensorFiles
from slm.errors import CheckpointError, VocabError
from slm.strategies.tasks import with_task_tokens
from slm.vocab import Vocab

HF_DIR = "hf"  # source config.json and tokenizer files, kept for export
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclasses.dataclass
class ImportResult:
    out: Path
    family: str
    config: Config
    vocab: Vocab
    stats: LoadStats
    params: dict  # on the mesh, as saved


def text_pieces(model_dir: Path, rows: int) -> list[str]:
    """The LLM tokenizer's pieces in id order, one per embedding row. Rows no token owns (tables
    padded for speed, as Qwen2's) print as <tN>, the name the vocabulary gives unnamed ids."""
    from slm.text.tokenizer import HFTokenizer

    pieces = HFTokenizer.load(model_dir).pieces()
    if len(pieces) > rows:
        raise VocabError(f"{model_dir}: the tokenizer has ids up to {len(pieces) - 1} but "
                         f"config.json `vocab_size` is {rows}; the tokenizer does not belong to "
                         "these weights")
    return pieces + [f"<t{i}>" for i in range(len(pieces), rows)]


def build_vocab(base: Config, pieces: list[str], model_dir: Path, speech: bool) -> Vocab:
    """The LLM's tokenizer as the text range, plus the speech ranges of `base` when asked.

    With a speech config, the vocabulary is the one `slm tokenizers train` makes with
    `tokenizers.hf_text_dir` set to this model: read from `tokenizers.dir`/vocab.json when the
    tokenizers exist, otherwise built from the `tokenizers` sizes (units, codebooks); with the
    specials of its `strategy.task_format`.
    """
    if not speech:
        return Vocab.build(text_size=len(pieces), text_pieces=pieces)
    tok = base.tokenizers
    saved = Path(tok.dir) / "vocab.json" if tok.dir else None
    if saved is not None and saved.is_file():
        vocab = Vocab.load(saved)
        if vocab.text_pieces != tuple(pieces):
            raise VocabError(f"{saved}: its text range was not made by the tokenizer in "
                             f"{model_dir}; train the tokenizers with "
                             f"tokenizers.hf_text_dir={model_dir}")
    else:
        vocab = Vocab.build(text_size=len(pieces), num_units=tok.num_units,
                            num_codebooks=tok.num_codebooks, codebook_size=tok.codebook_size,
                            text_pieces=pieces)
    return with_task_tokens(vocab, base.strategy.task_format)


def converted_config(base: Config, hf: HFModel, model_dir: Path, param_dtype: str,
                     vocab: Vocab) -> Config:
    """`base` with the LLM's architecture, its tokenizer as text tokenizer, resolved streams.
    The converted checkpoint is a base: without `base`'s LoRA adapters or frozen parameters,
    which a run started from it (`checkpoint.init_from`) adds."""
    from slm.strategies import with_strategy_streams

    model = dataclasses.replace(base.model, **hf.fields, param_dtype=param_dtype,
                                lora=LoraConfig())
    tokenizers = dataclasses.replace(base.tokenizers, hf_text_dir=str(model_dir))
    train = dataclasses.replace(base.train, trainable=["all"])
    config = dataclasses.replace(base, model=model, tokenizers=tokenizers, train=train)
    return with_strategy_streams(config, vocab)


def import_hf(model_dir: str | Path, out: str | Path, speech_config: str | Path | None = None,
              param_dtype: str = "float32", mesh=None, progress: bool = True) -> ImportResult:
    from tqdm import tqdm

    from slm.parallel.mesh import make_mesh
    from slm.train.optim import make_optimizer
    from slm.train.state import plan_state

    model_dir, out = Path(model_dir).absolute(), Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new --out or remove it")
    hf = hf_model(read_config_json(model_dir), str(model_dir / "config.json"))
    files = TensorFiles(model_dir)
    base = load_config(speech_config) if speech_config else Config()
    vocab = build_vocab(base, text_pieces(model_dir, hf.vocab_size), model_dir,
                        speech_config is not None)
    config = converted_config(base, hf, model_dir, param_dtype, vocab)
    mesh = mesh if mesh is not None else make_mesh(config.mesh)
    optimizer = make_optimizer(config.optim, config.train.steps)
    plan = plan_state(config, vocab, mesh, optimizer)
    bar = (lambda items: tqdm(items, desc="parameters", unit="tensor")) if progress else (
        lambda items: items)
    params, stats = load_params(config, vocab, hf, files, plan, bar)
    _save(out, config, vocab, plan, optimizer, params)
    _keep_hf_files(model_dir, out / HF_DIR)
    return ImportResult(out, hf.family, config, vocab, stats, params)


def _save(out: Path, config: Config, vocab: Vocab, plan, optimizer, params) -> None:
    """A step-0 checkpoint through the training checkpointer, so every reader of those works."""
    from slm.train.checkpoint import Checkpointer
    from slm.train.state import TrainState

    opt_state = jax.jit(optimizer.init, out_shardings=plan.state_shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), plan.state_shardings.step)
    cfg = CheckpointConfig(dir=str(out), every_steps=1, keep=1, async_save=False)
    checkpointer = Checkpointer(cfg, config, vocab)
    checkpointer.save(TrainState(step, params, opt_state), {}, force=True)
    checkpointer.close()
    vocab.save(out / "vocab.json")
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _keep_hf_files(model_dir: Path, dest: Path) -> None:
    """Everything but the weights: config.json, tokenizer files, generation config."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) \
                and not path.name.endswith(".index.json"):
            shutil.copy2(path, dest / path.name)
