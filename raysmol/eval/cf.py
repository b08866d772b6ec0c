"""Cloze (CF) and multiple-choice (MCF) benchmark scoring: suites, prompts, LightEval runs, an in-loop scorer.

A *suite* YAML lists tasks (MMLU, ARC, HellaSwag, ...): where the data is (a hub repo/subset/split, or a local
folder), which row *schema* maps a row to a prompt, and the *formulation*:

* ``cf`` (cloze): the prompt is the question, each choice is scored as its own continuation;
* ``mcf``: the prompt lists the options as "A. ... B. ..." and the continuations are the letters " A", " B".

Either way the prediction is the choice with the highest log-likelihood divided by its length in characters
(char-normalised, LightEval's ``acc_norm``; the SmolLM3 ablations report CF this way because small models score
near chance on MCF until late in training, see the Smol Training Playbook's evaluation chapter).

Two scorers share the prompt rendering below:

* :func:`evaluate_suite` runs LightEval in a *separate process* (``raysmol/eval/lighteval_tasks.py``): importing
  LightEval's transformers model turns autograd off process-wide, and its sample cache keys on the model name,
  not the weights, so each call gets a fresh process, a fresh cache and a content-hashed model name.
* :func:`score_choices` is pure torch/transformers, for evaluation inside the training loop: it tokenizes and
  scores exactly as LightEval does, so the two agree sample for sample (tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from raysmol.config import ConfigError, read_yaml_mapping
from raysmol.config import build_section
from raysmol.model.folder import ModelFolderError, resolve_model
from raysmol.train.hooks import Hook

Formulation = Literal["cf", "mcf"]
METRIC = "acc_norm"  # LightEval's name for LogLikelihoodAccMetric(normalization=LogProbCharNorm())
# LightEval shuffles a task's documents with this seed before taking max_samples (LightevalTask.get_docs);
# load_docs does the same so the in-loop scorer sees the samples `raysmol eval` sees.
_LIGHTEVAL_SHUFFLE_SEED = 42
_TASK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # LightEval parses "|", "," and "@" (and ":" groups tasks)
# Files that make up a Hugging Face model folder (save_pretrained output).


class SuiteError(ConfigError):
    """A suite file, task schema, dataset or checkpoint that cannot be used; names the file, key and valid values.

    A ConfigError, so the CLI reports it like any other bad input (exit status 2)."""


class EvalError(RuntimeError):
    """The LightEval process failed; the message holds the tail of its log and where the full log is."""


# ----------------------------------------------------------------------------------------- prompts


@dataclass
class Item:
    """One scored sample. Attribute names match LightEval's ``Doc``, so scorers accept either."""

    query: str
    choices: list[str]
    gold_index: int
    id: str = ""


def _letters(n: int) -> list[str]:
    return list(string.ascii_uppercase[:n])


def _mcf(question: str, options: Sequence[str], gold: int) -> Item:
    listed = "".join(f"{letter}. {option}\n" for letter, option in zip(_letters(len(options)), options))
    return Item(f"Question: {question}\n{listed}Answer:", [f" {x}" for x in _letters(len(options))], gold)


def _question(question: str, options: Sequence[str], gold: int, formulation: Formulation) -> Item:
    """A question answered by one of `options`: CF scores each option after "Answer:"."""
    if formulation == "mcf":
        return _mcf(question, options, gold)
    return Item(f"Question: {question}\nAnswer:", [f" {o}" for o in options], gold)


def _continuation(context: str, options: Sequence[str], gold: int, formulation: Formulation) -> Item:
    """A text that one of `options` continues: CF scores each option as the next words of the text."""
    if formulation == "mcf":
        return _mcf(context, options, gold)
    # No trailing space on the context: the space belongs to the continuation, as in pretraining text.
    return Item(context.rstrip(), [f" {o.strip()}" for o in options], gold)


# --- row schemas: one function per dataset layout (field names of the hub datasets named in the docstrings)


def _qa(row: dict, f: Formulation) -> Item:
    """cais/mmlu (and local data): question, choices: [str], answer: int."""
    return _question(row["question"], row["choices"], int(row["answer"]), f)


def _labelled(question_key: str) -> Callable[[dict, Formulation], Item]:
    """allenai/ai2_arc, tau/commonsense_qa (question) and allenai/openbookqa (question_stem):
    choices: {text: [str], label: [str]}, answerKey: one of the labels ("A".."E" or "1".."5")."""

    def to_item(row: dict, f: Formulation) -> Item | None:
        choices = row["choices"]  # the error for a row that does not fit quotes the outer docstring
        if not row["answerKey"]:  # unlabeled test rows
            return None
        return _question(row[question_key], choices["text"], choices["label"].index(row["answerKey"]), f)

    to_item.__doc__ = _labelled.__doc__
    return to_item


def _hellaswag_text(text: str) -> str:
    # WikiHow rows carry markup like "[title]" and "[header]"; the harness's preprocessing removes it.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict, f: Formulation) -> Item | None:
    """Rowan/hellaswag: activity_label, ctx_a, ctx_b, endings: [str], label: "0".."3" ("" on test)."""
    if row["label"] in ("", None):
        return None
    context = _hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return _continuation(context, [_hellaswag_text(e) for e in row["endings"]], int(row["label"]), f)


def _winogrande(row: dict, f: Formulation) -> Item | None:
    """allenai/winogrande: sentence with one "_", option1, option2, answer: "1"|"2" ("" on test).

    CF scores "option + rest of the sentence" after the text before the blank (LightEval's formulation)."""
    if row["answer"] in ("", None):
        return None
    gold = int(row["answer"]) - 1
    options = [row["option1"], row["option2"]]
    if f == "mcf":
        return _mcf(row["sentence"], options, gold)
    before, after = row["sentence"].split("_", 1)
    return Item(before.rstrip(), [f" {o}{after}" for o in options], gold)


def _piqa(row: dict, f: Formulation) -> Item:
    """ybisk/piqa: goal, sol1, sol2, label: 0|1."""
    return _question(row["goal"], [row["sol1"], row["sol2"]], int(row["label"]), f)


def _cloze(row: dict, f: Formulation) -> Item:
    """Local data: context (a text to continue), choices: [str], answer: int."""
    return _continuation(row["context"], row["choices"], int(row["answer"]), f)


SCHEMAS: dict[str, Callable[[dict, Formulation], Item | None]] = {
    "qa": _qa,
    "mmlu": _qa,
    "arc": _labelled("question"),
    "commonsense_qa": _labelled("question"),
    "openbookqa": _labelled("question_stem"),
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "piqa": _piqa,
    "cloze": _cloze,
}


# ------------------------------------------------------------------------------------------- suites


@dataclass
class TaskSpec:
    name: str = ""
    schema: str = ""
    # Hub dataset; `path` (a local folder with <split>.jsonl or parquet files) replaces it when set.
    hf_repo: str | None = None
    hf_subset: str = "default"
    split: str = "validation"
    path: str | None = None
    formulation: Formulation | None = None  # None: the suite's
    max_samples: int | None = None  # None: the suite's; LightEval takes a seeded random subset of this size

    def dataset(self) -> tuple[str, str]:
        """(repo or folder, subset) as datasets.load_dataset takes them; a local folder has one subset."""
        return (self.path, "default") if self.path else (self.hf_repo, self.hf_subset)

    def to_item(self, row: dict, index: int) -> Item | None:
        try:
            item = SCHEMAS[self.schema](row, self.formulation)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise SuiteError(f"task {self.name!r}: row {index} of {self.dataset()[0]} does not fit schema "
                             f"{self.schema!r} ({type(e).__name__}: {e}); its fields: {sorted(row)}. "
                             f"{' '.join(SCHEMAS[self.schema].__doc__.split())}") from e
        if item is not None:
            item.id = str(index)  # LightEval's Doc.id: the row's index in the split
        return item


@dataclass
class Suite:
    name: str = ""
    formulation: Formulation = "cf"
    max_samples: int | None = None
    tasks: list[TaskSpec] = field(default_factory=list)
    origin: str = ""


def load_suite(path: str | os.PathLike[str]) -> Suite:
    """Read and check a suite YAML; task defaults filled in, local paths made absolute and checked."""
    path = Path(path)
    raw = read_yaml_mapping(path, "suite", SuiteError)
    where = str(path)
    try:
        suite = build_section(Suite, raw, "", where)
    except ConfigError as e:
        raise SuiteError(str(e)) from e
    suite.origin = where
    _check_suite(suite, where, path.parent)
    return suite


def _check_suite(suite: Suite, where: str, base: Path) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise SuiteError(f"{where}: {key}: {msg}")

    need(bool(suite.name), "name", "missing: every suite needs a name (it goes into the result files)")
    need(bool(suite.tasks), "tasks", "missing or empty: list the tasks to evaluate")
    need(suite.max_samples is None or suite.max_samples > 0, "max_samples", "must be a positive integer")
    seen: set[str] = set()
    for i, task in enumerate(suite.tasks):
        key = f"tasks.{i}"
        need(bool(task.name), f"{key}.name", "missing")
        need(bool(_TASK_NAME.match(task.name)), f"{key}.name",
             f"{task.name!r} may only hold letters, digits, '_', '.' and '-'")
        need(task.name not in seen, f"{key}.name", f"{task.name!r} is listed twice")
        seen.add(task.name)
        need(task.schema in SCHEMAS, f"{key}.schema",
             f"{'missing' if not task.schema else f'unknown schema {task.schema!r}'}; "
             f"valid: {', '.join(sorted(SCHEMAS))}")
        need(bool(task.hf_repo or task.path), f"{key}.hf_repo",
             "missing: give a hub dataset (hf_repo, hf_subset, split) or a local folder (path)")
        need(task.max_samples is None or task.max_samples > 0, f"{key}.max_samples", "must be a positive integer")
        task.formulation = task.formulation or suite.formulation
        task.max_samples = task.max_samples or suite.max_samples
        if task.path:
            task.path = str((base / os.path.expanduser(task.path)).resolve())
            _check_local_dataset(Path(task.path), task.split, where, f"{key}.path")


def _check_local_dataset(folder: Path, split: str, where: str, key: str) -> None:
    if not folder.is_dir():
        raise SuiteError(f"{where}: {key}: dataset folder {str(folder)!r} does not exist")
    # datasets.load_dataset(folder) names splits after the files: validation.jsonl, data/test-0000.parquet, ...
    if not any(p.is_file() and split in p.name for p in folder.rglob("*")):
        raise SuiteError(f"{where}: {key}: {str(folder)!r} has no file for split {split!r} "
                         f"(expected e.g. {split}.jsonl or {split}-00000-of-00001.parquet)")


def load_docs(task: TaskSpec, max_samples: int | None = None) -> list[Item]:
    """The samples LightEval evaluates for `task`: rows mapped by the schema, shuffled with LightEval's seed,
    the first `max_samples` (default: the task's) kept."""
    from datasets import load_dataset

    repo, subset = task.dataset()
    rows = load_dataset(repo, subset, split=task.split)
    docs = [d for i, row in enumerate(rows) if (d := task.to_item(row, i)) is not None]
    random.Random(_LIGHTEVAL_SHUFFLE_SEED).shuffle(docs)
    n = max_samples or task.max_samples
    return docs[:n] if n else docs


# --------------------------------------------------------------------------- in-process scoring (no LightEval)


def char_norm_argmax(logprobs: Sequence[float], choices: Sequence[str]) -> int:
    """Index of the choice with the highest log-likelihood per character (first one on ties, like np.argmax)."""
    normed = [lp / len(c) for lp, c in zip(logprobs, choices)]
    return max(range(len(normed)), key=normed.__getitem__)


def _encode(tokenizer, query: str, choices: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    # LightEval's tok_encode_pair(pairwise=True): trailing whitespace of the context moves to the front of
    # each continuation, the context gets special tokens (BOS) but never ends in EOS, continuations get none.
    n_spaces = len(query) - len(query.rstrip())
    if n_spaces:
        choices = [query[-n_spaces:] + c for c in choices]
        query = query[:-n_spaces]
    context = tokenizer.encode(query, add_special_tokens=True)
    if context and context[-1] == tokenizer.eos_token_id:
        context = context[:-1]
    return context, [tokenizer.encode(c, add_special_tokens=False) for c in choices]


@contextlib.contextmanager
def _inference(model):
    # Scoring inside the training loop: no graph, dropout off, and the caller's mode restored afterwards.
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def choice_logprobs(model, tokenizer, docs: Iterable[Any], *, batch_size: int = 32,
                    max_length: int | None = None) -> list[list[float]]:
    """Sum of log-probabilities of each choice's tokens given the doc's query, per doc (batched forward
    passes of `batch_size` sequences; sequences longer than `max_length` lose tokens on the left, as in
    LightEval; default: the model's max_position_embeddings)."""
    import torch

    docs = list(docs)
    max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    requests = []  # (doc index, choice index, token ids, number of continuation tokens)
    for d, doc in enumerate(docs):
        context, continuations = _encode(tokenizer, doc.query, doc.choices)
        requests += [(d, c, (context + cont)[-max_length:], len(cont)) for c, cont in enumerate(continuations)]
    requests.sort(key=lambda r: -len(r[2]))  # similar lengths together: less padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    out = [[0.0] * len(doc.choices) for doc in docs]
    with _inference(model):
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            width = max(len(r[2]) for r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, _, tokens, _) in enumerate(batch):  # right padding: causal attention never sees it
                ids[row, :len(tokens)] = torch.tensor(tokens)
                mask[row, :len(tokens)] = 1
            logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(),
                                     dim=-1)
            for row, (d, c, tokens, n) in enumerate(batch):
                # Position p predicts token p + 1: the continuation's tokens are predicted at [len-n-1, len-1).
                targets = torch.tensor(tokens[len(tokens) - n:], device=device)
                out[d][c] = logp[row, len(tokens) - n - 1:len(tokens) - 1].gather(-1, targets[:, None]).sum().item()
    return out


def predict(model, tokenizer, docs: Iterable[Any], *, batch_size: int = 32) -> list[int]:
    """Char-normalised log-likelihood argmax per doc."""
    docs = list(docs)
    scores = choice_logprobs(model, tokenizer, docs, batch_size=batch_size)
    return [char_norm_argmax(s, doc.choices) for s, doc in zip(scores, docs)]


def score_choices(model, tokenizer, docs: Iterable[Any], *, batch_size: int = 32) -> float:
    """Char-normalised accuracy of a model (in memory, e.g. the one being trained) on CF/MCF docs: objects with
    ``query``, ``choices`` and ``gold_index`` (:class:`Item` from :func:`load_docs`, or LightEval ``Doc``)."""
    docs = list(docs)
    if not docs:
        raise ValueError("score_choices: no docs to score")
    preds = predict(model, tokenizer, docs, batch_size=batch_size)
    return sum(p == doc.gold_index for p, doc in zip(preds, docs)) / len(docs)


class TrainingSuite(Hook):
    """A suite scored inside the training loop at every validation (a loop hook): docs loaded once by the driver,
    a tokenizer shipped as files (workers may run on nodes without the driver's cache). Picklable, so it travels
    in the loop config."""

    def __init__(self, suite_path: str, samples: int, tokenizer_dir: str | os.PathLike[str]):
        suite = load_suite(suite_path)
        self.name = suite.name
        self.docs = {t.name: load_docs(t, samples) for t in suite.tasks}
        self.tokenizer_files = {p.name: p.read_bytes() for p in Path(tokenizer_dir).iterdir() if p.is_file()}
        self._tokenizer = None

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def evaluate(self, ctx) -> dict[str, float]:
        return self.scores(ctx.engine.module)  # every rank scores (ZeRO-3 forwards are collective); rank 0 logs

    def scores(self, model) -> dict[str, float]:
        """`eval/<task>` accuracies of an in-memory model (it is left in the mode it was in).

        Under ZeRO-3 every rank must call this together: each forward gathers the sharded weights."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            with tempfile.TemporaryDirectory(prefix="raysmol-tok-") as d:
                for name, data in self.tokenizer_files.items():
                    (Path(d) / name).write_bytes(data)
                self._tokenizer = AutoTokenizer.from_pretrained(d)
        return {f"eval/{name}": score_choices(model, self._tokenizer, docs) for name, docs in self.docs.items()}


# ------------------------------------------------------------------------------- LightEval in its own process


def resolve_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The Hugging Face model folder for `checkpoint_dir` (raysmol.model.folder.resolve_model), as a SuiteError."""
    try:
        return resolve_model(checkpoint_dir)
    except ModelFolderError as e:
        raise SuiteError(str(e)) from e


def model_identity(folder: Path) -> dict[str, str]:
    """Path, SHA-256 over the folder's files (names and contents) and a name unique to that content."""
    from raysmol.train.checkpoint import sha256

    h = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f"{file.name}\0{sha256(file)}\n".encode())
    digest = h.hexdigest()
    return {"path": str(folder), "sha256": digest, "name": f"{folder.name}-{digest[:12]}"}


def evaluate_suite(checkpoint_dir: str | os.PathLike[str], suite_path: str | os.PathLike[str],
                   out_dir: str | os.PathLike[str], *, max_samples: int | None = None, batch_size: int = 64,
                   device: str = "cpu", timeout_s: float | None = None) -> dict[str, dict[str, Any]]:
    """Score a Hugging Face checkpoint on a suite with LightEval, in a child process.

    Returns ``{task: {score, stderr, samples, formulation, suite, metric, model, details}}`` (``details``: per
    sample id, gold, choice log-likelihoods, prediction, correct) and writes the same as
    ``out_dir/<model name>/<suite>/<task>.json``. `max_samples` overrides the suite's. `batch_size` counts
    sequences per forward pass (one per choice). `device` "cpu" hides GPUs from the child; "cuda" uses one.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"evaluate_suite: device must be 'cpu' or 'cuda', got {device!r}")
    suite = load_suite(suite_path)
    model_dir = resolve_checkpoint(checkpoint_dir)
    identity = model_identity(model_dir)
    tasks = [dataclasses.replace(t, max_samples=max_samples or t.max_samples) for t in suite.tasks]
    results_dir = Path(out_dir) / identity["name"] / suite.name
    results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="raysmol-eval-") as tmp:
        raw = _run_lighteval(Path(tmp), model_dir, identity, tasks, batch_size, device, results_dir, timeout_s)
    results = {}
    for task in tasks:
        r = raw[task.name]
        results[task.name] = {"task": task.name, "suite": suite.name, "formulation": task.formulation,
                              "metric": METRIC, "score": r["score"], "stderr": r["stderr"],
                              "samples": len(r["details"]), "max_samples": task.max_samples,
                              "dataset": _dataset_ref(task), "model": identity, "run_seconds": raw["_seconds"],
                              "details": r["details"]}
        (results_dir / f"{task.name}.json").write_text(json.dumps(results[task.name], indent=1))
    return results


def _dataset_ref(task: TaskSpec) -> dict[str, str | None]:
    if task.path:
        return {"path": task.path, "split": task.split}
    return {"hf_repo": task.hf_repo, "hf_subset": task.hf_subset, "split": task.split}


def _run_lighteval(tmp: Path, model_dir: Path, identity: dict, tasks: list[TaskSpec], batch_size: int,
                   device: str, results_dir: Path, timeout_s: float | None) -> dict:
    # LightEval names results and cache entries after the model path; a link named after the content hash
    # makes that name unique per weights, and the cache lives in this call's temporary folder.
    link = tmp / identity["name"]
    link.symlink_to(model_dir, target_is_directory=True)
    request = {"model": str(link), "cache_dir": str(tmp / "cache"), "batch_size": batch_size,
               "tasks": [dataclasses.asdict(t) for t in tasks], "output": str(tmp / "result.json")}
    (tmp / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if all(t.path for t in tasks):  # nothing to fetch: never wait on the hub (the model is a local folder too)
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    log = results_dir / "lighteval.log"
    start = time.perf_counter()
    with open(log, "wb") as f:
        try:
            proc = subprocess.run([sys.executable, "-m", "raysmol.eval.lighteval_tasks", str(tmp / "request.json")],
                                  stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise EvalError(f"LightEval did not finish within {timeout_s:.0f}s; log: {log}") from e
    result_file = Path(request["output"])
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if "error" in result:  # a bad row or dataset, reported by the child in our own words
        raise SuiteError(result["error"])
    if proc.returncode != 0 or not result:
        tail = log.read_text(errors="replace")[-3000:]
        raise EvalError(f"LightEval exited with status {proc.returncode}; last lines of {log}:\n{tail}")
    result["_seconds"] = round(time.perf_counter() - start, 2)
    return result


# ------------------------------------------------------------------------------------------------- CLI


def format_table(results: dict[str, dict[str, Any]]) -> str:
    width = max(len("task"), *(len(t) for t in results))
    lines = [f"{'task':<{width}}  {'form':<4}  {'samples':>7}  {METRIC:>8}  {'stderr':>7}"]
    for name, r in results.items():
        lines.append(f"{name:<{width}}  {r['formulation']:<4}  {r['samples']:>7}  {r['score']:>8.4f}  "
                     f"{r['stderr']:>7.4f}")
    return "\n".join(lines)
