"""`slm convert hf|to-hf|adapters`: pretrained checkpoints in and out, adapters alone."""

from __future__ import annotations

import argparse


def _convert_hf(args: argparse.Namespace) -> int:
    from slm.convert.hf_import import import_hf

    result = import_hf(args.model_dir, args.out, args.add_speech_vocab, args.param_dtype)
    print(f"{result.family} -> {result.out}: {result.vocab}")
    print(result.stats.describe())
    return 0


def _convert_to_hf(args: argparse.Namespace) -> int:
    from slm.convert.hf_export import export_hf

    result = export_hf(args.checkpoint, args.out, args.dtype)
    print(f"{result.family} text model ({result.vocab_size} ids, tied={result.tied}) -> "
          f"{result.out}; load it with AutoModelForCausalLM.from_pretrained")
    return 0


def _convert_adapters(args: argparse.Namespace) -> int:
    from slm.train.adapters import save_adapters

    out = save_adapters(args.checkpoint, args.out)
    print(f"trained parameters of {args.checkpoint} -> {out} (slm sample and slm convert to-hf "
          "read it with its base)")
    return 0


def add_commands(commands) -> None:
    convert = commands.add_parser("convert", help="pretrained checkpoints in and out").add_subparsers(
        dest="convert_command", required=True)
    from_hf = convert.add_parser("hf", help="a local Llama/Qwen2/Gemma transformers checkpoint "
                                            "-> an slm checkpoint")
    from_hf.add_argument("--model-dir", required=True, help="config.json, *.safetensors, tokenizer")
    from_hf.add_argument("--out", required=True, help="new checkpoint directory")
    from_hf.add_argument("--add-speech-vocab", metavar="CONFIG",
                         help="slm YAML whose tokenizers/strategy add speech ranges and streams")
    from_hf.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    from_hf.set_defaults(handler=_convert_hf)
    to_hf = convert.add_parser("to-hf", help="the text part of an slm checkpoint -> transformers")
    to_hf.add_argument("--checkpoint", required=True, help="checkpoint directory")
    to_hf.add_argument("--out", required=True, help="new model directory")
    to_hf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    to_hf.set_defaults(handler=_convert_to_hf)
    adapters = convert.add_parser("adapters", help="the trained parameters of a run over a frozen "
                                                   "base (LoRA, projector), without the base")
    adapters.add_argument("--checkpoint", required=True, help="checkpoint directory of the run")
    adapters.add_argument("--out", required=True, help="new adapter directory")
    adapters.set_defaults(handler=_convert_adapters)
