"""Print where a run's outputs are and how to compare runs (the end of `make demo`)."""

from __future__ import annotations

import json
import sys

from pipeline import registry
from pipeline.params import OUTPUT_ROOT, Reports, load_params_or_exit


def main() -> None:
    params = load_params_or_exit()
    run_id = sys.argv[1] if len(sys.argv) > 1 else params.run_id
    root = OUTPUT_ROOT / run_id
    metrics_file = Reports.evaluation
    print(f"\nrun {run_id!r} done.")
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        for name in ("base", "adapter"):
            m = metrics[name]
            print(f"  {name:8s} accuracy {m['accuracy']:.3f} (95% CI {m['accuracy_ci95'][0]:.3f}–"
                  f"{m['accuracy_ci95'][1]:.3f}), strict format {m['strict_format']:.3f}, {m['rows']} rows")
    print(f"  metrics:   {metrics_file}")
    print(f"  adapter:   {root / 'adapter'}")
    print(f"  plots:     {Reports.train_curves / 'plots'}, {Reports.comparison}  (dvc plots show)")
    print(f"  report:    {Reports.results}, {Reports.sample_outputs}")
    print(f"  registry:  {params.publish.registry_file} (entry {run_id!r}), "
          f"{registry.doc_path(params.publish.registry_file)}")
    print(f"  try it:    make infer RUN_ID={run_id} IMAGES=<image or folder> PROMPT=\"…\" (docs/inference_guide.md)")
    print(f"  compare runs: make compare, dvc metrics diff {run_id} <other run>, dvc plots diff {run_id} <other run>")


if __name__ == "__main__":
    main()
