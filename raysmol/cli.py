"""raysmol VERB [CONFIG] [key.sub=value ...]"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from raysmol import submit
from raysmol.eval import cli as eval_cli
from raysmol.config import ConfigError, load_config
from raysmol.train import export as train_export


def _config_args(p: argparse.ArgumentParser, optional: bool) -> None:
    p.add_argument("config", nargs="?" if optional else None, default=None,
                   help="YAML config (default: the embedded raysmol/jobs/tiny.yaml)" if optional else "YAML config")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values (parsed as YAML)")


def _split(args) -> tuple[str | None, list[str]]:
    # `raysmol pretrain train.steps=10` (no config): the first positional is an override, not a file.
    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def cmd_config(args) -> int:
    from raysmol.model import flops_per_token, param_count

    cfg = load_config(*_split(args))
    _adopt_base_shape(cfg)
    info = {"config": cfg.to_dict(), "parameters": param_count(cfg), "flops_per_token": flops_per_token(cfg),
            "derived": {"samples_per_step": cfg.train.samples_per_step(),
                        "grad_accum": cfg.train.grad_accum(cfg.train.num_workers),
                        "vocab_size": cfg.vocab_size(),
                        "total_tokens": cfg.train.steps * cfg.train.global_batch_tokens}}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(cfg.to_yaml().rstrip())
    print("---")
    print(f"parameters:         {info['parameters']:,}")
    print(f"FLOPs per token:    {info['flops_per_token']:,.0f}")
    for k, v in info["derived"].items():
        print(f"{k + ':':<20}{v:,}")
    return 0


def _adopt_base_shape(cfg) -> None:
    """Post-training configs take the model's shape from init_from (raysmol/post/base.py does the same before
    training); a base that is not there yet (the walk-through's runs/tiny before `raysmol pretrain`) is noted."""
    mode = cfg.post_training()
    if mode is None:
        return
    from raysmol.model.folder import ModelFolderError, resolve_model

    key = f"{mode}.init_from"
    try:
        base = resolve_model(getattr(cfg, mode).init_from)
    except ModelFolderError as e:
        print(f"raysmol: note: the model section below is a placeholder until {key} exists ({e})", file=sys.stderr)
        return
    cfg.adopt_model(json.loads((base / "config.json").read_text()), key)


def cmd_prepare(args) -> int:
    from raysmol.data.prepare import prepare
    from raysmol.data.tokenizer import tokenizer_for
    from raysmol.runtime import init_ray

    cfg = load_config(*_split(args))
    init_ray()
    tok = tokenizer_for(cfg)
    for s in prepare(cfg, tok):
        print(s.describe())
    return 0


def cmd_train(args) -> int:
    """pretrain, sft, dpo, grpo: the verb picks the task (raysmol/recipes.py)."""
    from raysmol.recipes import run
    from raysmol.rundir import format_summary, run_dir

    cfg = load_config(*_split(args))
    summary = run(args.verb, cfg)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary, run_dir(cfg)))
    return 0


def main(argv: list[str] | None = None) -> None:
    from raysmol.runtime import VERBOSE_ENV, verbose

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:  # anywhere on the line, for every verb; jobs and workers inherit it
        argv.remove("--verbose")
        os.environ[VERBOSE_ENV] = "1"
    parser = argparse.ArgumentParser(prog="raysmol", description="Train small LLMs on Ray (Smol Training Playbook).")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, DeepSpeed's, vLLM's and torch's output and workers' logs on the console "
                             "(by default they go to <run dir>/logs)")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("config", help="print the resolved config, parameter count and FLOPs per token; runs nothing")
    _config_args(p, optional=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_config)
    p = sub.add_parser("prepare", help="tokenize and shard the config's data sources with Ray Data")
    _config_args(p, optional=True)
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("pretrain", help="pretrain on Ray Train + DeepSpeed (default: the embedded tiny job)")
    _config_args(p, optional=True)
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON (default: a table)")
    p.set_defaults(fn=cmd_train)
    for verb, what in (("sft", "supervised fine-tuning on chat data (sft.data) from a base model (sft.init_from): "
                                "assistant-only loss, whole conversations packed"),
                       ("dpo", "direct preference optimisation on chosen/rejected pairs (dpo.data) against the frozen "
                               "dpo.init_from model"),
                       ("grpo", "GRPO: engine actors sample completions of grpo.data's prompts, rewards score them, "
                                "the policy learns from group-normalised advantages; weights synced every step")):
        p = sub.add_parser(verb, help=what)
        _config_args(p, optional=False)
        p.add_argument("--json", action="store_true", help="print the whole summary as JSON (default: a table)")
        p.set_defaults(fn=cmd_train)
    eval_cli.add_parser(sub)
    train_export.add_parser(sub)
    from raysmol import ledger
    from raysmol.ablate import signal, tune

    tune.add_parser(sub)
    from raysmol.post import merge as post_merge

    post_merge.add_parser(sub)
    ledger.add_parser(sub)
    signal.add_parser(sub)
    from raysmol import vibes

    vibes.add_parsers(sub)
    p = sub.add_parser("submit", help="run CONFIG on a Ray cluster as a job; or --status/--logs/--stop JOB")
    submit.add_arguments(p)
    p.set_defaults(fn=submit.main)
    args = parser.parse_args(argv)
    # Quiet by default: other libraries' warnings and up; raysmol's own notes (data prepared, ...) at INFO.
    logging.basicConfig(level=logging.INFO if verbose() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("raysmol").setLevel(logging.INFO)
    from raysmol.data.prepare import DataError
    from raysmol.data.tokenizer import TokenizerError
    from raysmol.eval.freeform import FreeformError
    from raysmol.eval.sandbox import SandboxUnavailable
    from raysmol.model.folder import ModelFolderError
    from raysmol.post.chat import ChatError
    from raysmol.serve.engines import EngineError

    try:
        sys.exit(args.fn(args))
    except (ConfigError, DataError, TokenizerError, submit.SubmitError, FreeformError, SandboxUnavailable,
            EngineError, ChatError, train_export.ExportError, ModelFolderError) as e:
        print(f"raysmol: error: {e}", file=sys.stderr)
        sys.exit(2)
