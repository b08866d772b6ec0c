"""Vibe checks (the playbook: read what every candidate model says, not only its scores).

    raysmol sample CHECKPOINT --prompts FILE [--out FILE.jsonl]    completions of fixed prompts, written and printed
    raysmol chat CHECKPOINT                                        talk to it (/reset starts over, /quit or EOF ends)

CHECKPOINT is a Hugging Face model folder, a run directory (its hf/) or either on object storage. Prompts go
through the model's chat template when it has one (--no-chat: plain text continuation). FILE is .jsonl (one
object per line with "prompt": text or a list of {"role", "content"} messages, and optionally "id") or plain text
(one prompt per line). The engine runs in this process (transformers by default, --engine vllm), no Ray needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from raysmol import storage
from raysmol.serve.engines import KINDS, EngineError, Sampling, make_engine
from raysmol.serve.prompts import chat_prompt, has_chat_template, read_prompts, sample


def _engine(args):
    from raysmol.model.folder import resolve_model

    folder = resolve_model(args.checkpoint)
    options = {"device": args.device} if args.engine == "transformers" and args.device else {}
    engine = make_engine(args.engine, str(folder), options=options)
    if args.chat and not has_chat_template(engine.tokenizer):
        raise EngineError(f"{args.checkpoint}: --chat needs a chat template and this model's tokenizer has none "
                          "(tokenizer_config.json: chat_template); use --no-chat")
    chat = has_chat_template(engine.tokenizer) if args.chat is None else args.chat
    return folder, engine, chat


def cmd_sample(args) -> int:
    rows = read_prompts(args.prompts)
    folder, engine, chat = _engine(args)
    sampling = Sampling(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                        seed=args.seed)
    started = time.monotonic()
    out_rows = sample(engine, rows, sampling, chat)
    took = time.monotonic() - started
    name = folder.parent.name if folder.name == "hf" else folder.name  # a run directory: the run's name
    out = args.out or str(Path("samples") / f"{name}.jsonl")
    meta = {"model": str(folder), "engine": args.engine, "prompt_format": "chat" if chat else "completion",
            "sampling": {"n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                         "max_tokens": args.max_tokens, "seed": args.seed}}
    storage.write_text(out, "".join(json.dumps({**meta, **r}) + "\n" for r in out_rows))
    for r in out_rows:
        shown = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
        print(f"### {r['id']}: {shown}")
        for i, c in enumerate(r["completions"]):
            print(f"--- sample {i}" if len(r["completions"]) > 1 else "---")
            print(c.strip())
        print()
    print(f"raysmol sample: {len(out_rows)} prompts x {args.n} in {took:.1f} s "
          f"({'chat template' if chat else 'plain text'}); wrote {out}", file=sys.stderr)
    return 0


def cmd_chat(args, stdin=None) -> int:
    stdin = stdin or sys.stdin
    folder, engine, chat = _engine(args)
    sampling = Sampling(n=1, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                        seed=args.seed)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system and chat else []
    interactive = stdin.isatty()
    print(f"raysmol chat: {folder} ({'chat template' if chat else 'plain text: each line is continued'}); "
          "/reset starts over, /quit ends", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            history = history[:1] if history and history[0]["role"] == "system" else []
            print("(history cleared)")
            continue
        if not line.strip():
            continue
        turn = [*history, {"role": "user", "content": line}]
        prompt = chat_prompt(engine.tokenizer, turn) if chat else line
        reply = engine.generate([prompt], sampling)[0][0].text.strip()
        print(f"model> {reply}", flush=True)
        if chat:
            history = [*turn, {"role": "assistant", "content": reply}]


def _common(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="model folder or run directory (local or s3://...)")
    p.add_argument("--engine", choices=KINDS, default="transformers", help="default: transformers (in this process)")
    p.add_argument("--device", default=None, help="transformers engine: cpu or cuda (default: cuda if available)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="use the model's chat template (default: when it has one)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=temperature, help=f"default {temperature} (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0 if temperature == 0 else 0.95)
    p.add_argument("--seed", type=int, default=0)


def add_parsers(sub) -> None:
    p = sub.add_parser("sample", help="write completions of fixed prompts from a checkpoint (a vibe check)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, temperature=0.0)
    p.add_argument("--prompts", required=True, metavar="FILE", help=".jsonl ({\"prompt\": ...} per line) or .txt")
    p.add_argument("--out", metavar="FILE.jsonl", help="default: samples/<checkpoint name>.jsonl")
    p.add_argument("--n", type=int, default=1, help="completions per prompt (default 1)")
    p.set_defaults(fn=cmd_sample)
    p = sub.add_parser("chat", help="talk to a checkpoint in the terminal", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, temperature=0.7)
    p.add_argument("--system", help="a system message (chat template only)")
    p.set_defaults(fn=cmd_chat)
