"""Model folders on the command line: `widenet import`, `widenet upcycle` and `widenet export`.

    widenet import HF_DIR --out DIR [--overwrite]
    widenet upcycle --from HF_DIR|RUN|DIR --experts E [--top-k K] [--attention mean|block:N]
                    [--noise X] [--seed S] [--dropless] --out DIR [--overwrite]
    widenet export RUN --to DIR [--ema] [--format widenet|hf] [--overwrite]

Each writes an export folder (widenet/train/exported.py) that
`widenet.from_pretrained(DIR)`, `widenet predict --checkpoint DIR` and the
training commands' `--init DIR` read; `export --format hf` writes a Hugging
Face checkpoint folder instead (models/hf_export.py), which they read too.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .cli_args import finite_float, nonempty, positive_int
from .listing import counted


def _describe(source: Any) -> dict:
    """What an export records of where its weights came from."""
    return dict(path=os.path.abspath(source.path), step=source.step, model=source.meta.get("model", ""))


def _write(args: argparse.Namespace, source: Any, model, out: str, note: str, model_name: str | None = None,
           hf: bool = False) -> int:
    """Write `model` as an export of `source` (its name, classes, statistics, tokenizer, inputs), named
    model_name when it is another model than the source's; hf: as a Hugging Face checkpoint folder."""
    from .data.text.tokenizer import TokenizerError
    from .train.exported import model_kind, run_tokenizer_file, source_tokenizer, write_export

    run = source.step is not None and model_kind(source.meta.get("model_config") or {}) == "text"  # a text run
    try:
        tokenizer = source_tokenizer(source)
    except TokenizerError as err:
        if run:  # its own tokenizer, damaged: it cannot be trained again alike
            raise
        tokenizer = None
        source.notes.append(f"the tokenizer was not kept ({err}); pass one to finetune with --tokenizer")
    if tokenizer is None and run:
        raise TokenizerError(f"{run_tokenizer_file(source.path)} is missing: the run's model reads ids "
                             "of that tokenizer, and one trained again would not cut text alike; put it back")
    write_export(out, model, model_name=model_name or source.meta.get("model", ""), classes=source.classes,
                 image_stats=source.image_stats,
                 tokenizer=tokenizer, source=dict(_describe(source), how=note), overwrite=args.overwrite,
                 protect=source.path if source.path.is_dir() else source.path.parent,
                 data=(source.meta.get("data") or {}).get("name"), inputs=source.text_inputs,
                 untrained_head=source.untrained_head, image_resize=source.image_resize, hf=hf)
    if hf and model_kind(model.cfg.to_dict()) == "vision" and (source.image_resize or {}).get("crop", True):
        source.notes.append("transformers' ViT image processor squashes an image to a square, where widenet's "
                            "predict cuts out its central square first: the two agree on square images")
    if hf and getattr(model.cfg, "task", None) == "qa":
        source.notes.append("AlbertForQuestionAnswering has no pooler, so this model's (which QA does not use) is "
                            "not written: a classifier fine-tuned from the folder starts with a new one")
    for line in source.notes:
        print(f"note: {line}")
    loader = (f"transformers' {_hf_class(out)}.from_pretrained({str(out)!r}) or `widenet import`" if hf else
              f"widenet.from_pretrained({str(out)!r})")
    print(f"wrote {out} ({note}); load it with {loader}")
    return 0


def _refuse_destination(out: str, flag: str) -> None:
    """A file at OUT, or where a folder above it would be, refused before any work, naming the flag
    (write_export, for Python callers, refuses it too, as FileExistsError)."""
    from pathlib import Path

    from .files import refuse_non_folder

    refuse_non_folder(Path(out), flag)


def _hf_class(folder: str) -> str:
    import json

    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)["architectures"][0]


def cmd_import(args: argparse.Namespace) -> int:
    from .models.hf import is_hf_folder
    from .train.exported import config_problem, is_export, load_model, load_source

    _refuse_destination(args.out, "--out")
    if is_export(args.hf_dir):
        raise ValueError(f"{args.hf_dir}: already a widenet export; eval, predict, finetune --init and "
                         "from_pretrained read it as it is")
    if not is_hf_folder(args.hf_dir):
        raise ValueError(config_problem(args.hf_dir, hf_only=True))
    source = load_source(args.hf_dir)
    return _write(args, source, load_model(source), args.out, "imported from Hugging Face")


def cmd_upcycle(args: argparse.Namespace) -> int:
    from .models.upcycle import upcycle
    from .train.exported import load_model, load_source

    _refuse_destination(args.out, "--out")
    source = load_source(args.source)
    moe = dict(dropless=True) if args.dropless else {}
    dense = load_model(source)
    model = upcycle(dense, args.experts, args.top_k, attention=args.attention, noise=args.noise, seed=args.seed,
                    **moe)
    enc = dense.cfg.encoder
    if args.top_k == 1:  # upcycle renormalises, so that the experts' copies give the dense model's outputs
        source.notes.append("top-1 with renormalised combine weights (each is then 1): the router learns from the "
                            "balance loss alone, never from the task; --top-k 2 lets the task train it")
    if enc.share_attention and enc.share_ffn and not args.dropless and not args.noise:
        source.notes.append(f"the experts keep a capacity ({model.cfg.encoder.moe.capacity_factor} x their share "
                            "of the tokens): a token over an expert's capacity is dropped there, and its output "
                            "differs from the dense model's; with --dropless every output is the dense model's")
    note = (f"upcycled to {counted(args.experts, 'expert')}, top-{args.top_k}, attention {args.attention}, "
            f"noise {args.noise}")
    return _write(args, source, model, args.out, note, _widenet_name(source.meta.get("model", "")))


def _attention_choice(text: str) -> str:
    if text == "mean" or (text.startswith("block:") and text[6:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected mean or block:N, got {text!r}")


def _widenet_name(name: str) -> str:
    return f"{name}_upcycled" if name else "widenet_upcycled"


def cmd_export(args: argparse.Namespace) -> int:
    from .models.hf import is_hf_folder
    from .train.ema import averaged_weights
    from .train.exported import is_export, load_model, load_source

    _refuse_destination(args.to, "--to")
    source = load_source(args.run)
    origin = ("copied from a widenet export" if is_export(args.run) else
              "converted from a Hugging Face folder" if is_hf_folder(args.run) else f"exported from step {source.step}")
    if args.ema:
        source.model_state = averaged_weights(source)
    model = load_model(source)
    return _write(args, source, model, args.to, origin + (" (EMA)" if args.ema else ""), hf=args.format == "hf")


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="convert a Hugging Face ALBERT, BERT or ViT folder into a widenet folder")
    p.add_argument("hf_dir", type=nonempty, metavar="HF_DIR", help="folder with config.json and model.safetensors")
    p.add_argument("--out", "--to", dest="out", type=nonempty, required=True, metavar="OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("upcycle", help="sparse upcycling: a dense model's weights start a WideNet")
    p.add_argument("--from", dest="source", type=nonempty, required=True, metavar="PATH",
                   help="Hugging Face folder, run folder, checkpoint or widenet folder of a dense model")
    p.add_argument("--experts", type=positive_int, required=True, help="number of experts E")
    p.add_argument("--top-k", type=positive_int, default=2)
    p.add_argument("--attention", default="mean", metavar="mean|block:N", type=_attention_choice,
                   help="the shared attention from per-block ones: their mean or block N's (default mean)")
    p.add_argument("--noise", type=finite_float, default=0.0,
                   help="add noise * std(W) * N(0,1) to each expert copy, noise from 0 to 1 (default 0: exact copies)")
    p.add_argument("--dropless", action="store_true", help="never drop an assignment (the MoE's dropless mode)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router's init and the noise")
    p.add_argument("--out", "--to", dest="out", type=nonempty, required=True, metavar="OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("export", help="write a run's model as a folder to ship (config.json, model.safetensors)")
    p.add_argument("run", type=nonempty, metavar="RUN", help="run folder or checkpoint folder")
    p.add_argument("--to", "--out", dest="to", type=nonempty, required=True, metavar="DIR")
    p.add_argument("--ema", action="store_true", help="export the weight average of --ema-decay")
    p.add_argument("--format", choices=("widenet", "hf"), default="widenet",
                   help="widenet: widenet's folder (default); hf: a Hugging Face checkpoint that transformers loads "
                        "(ViT, and ALBERT-style post-norm text models)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model in an existing DIR (files you added beside it, e.g. a README, stay)")
    p.set_defaults(func=cmd_export)
