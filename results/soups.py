"""
results/soups.py: the dev-chosen soups of an AdaMix run that finished before train.py tested them.

    python results/soups.py runs/study/short-adamix-adapter-lr3e-3-bf16-s3 ...   # adds to its JSON

For each run folder (train.py's --out_dir, with model.pt and metrics.json) the experts of the epoch
chosen on dev are loaded and train.choose_soups picks on dev the best expert alone and a greedy soup
(Wortsman et al., ICML 2022); both are tested, in the run's own precision. The run's summary
results/runs/<folder name>.json gains test["greedy"], test["best-expert"] and "soups", as train.py
writes them today; the numbers it already had are left as they are.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def add_soups(folder, summaries=ROOT / "results" / "runs"):
    folder = Path(folder)
    summary = summaries / f"{folder.name}.json"
    results = json.loads(summary.read_text())
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    cfg = train.TrainConfig(**{k: v for k, v in results["config"].items() if k in fields})
    device = "cpu"
    torch.manual_seed(cfg.seed)
    _, task, net, router = train.load_task_and_model(cfg)
    chosen = train.torch_load(folder / "model.pt", device)
    if chosen["run_id"] != results["run_id"]:
        raise SystemExit(f"{folder}/model.pt is of run {chosen['run_id']}, not {results['run_id']}")
    train.load_small_state(net, chosen["weights"], cfg)
    _, dev, test = train.select_splits(task, train.task_kind(task), cfg)
    ctx = train.autocast(cfg.precision, device)
    modes, info = train.choose_soups(net, router, dev, task, cfg, ctx, device)
    for name, mode in modes.items():
        results["test"][name] = train.evaluate(net, router, test, task, cfg, mode, ctx, device)
    results["soups"] = info
    summary.write_text(json.dumps(results, indent=2))
    merged = results["test"]["merged"]
    print(f"{folder.name}: merged {merged}, greedy {results['test']['greedy']} ({modes['greedy']}), "
          f"best expert {results['test']['best-expert']} ({modes['best-expert']})")


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        add_soups(folder)
