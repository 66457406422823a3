"""A measurement subprocess: `python -m peftlab_bench.worker KIND JSON_KWARGS OUT_FILE`
runs one measurement and writes its JSON result to OUT_FILE."""

import json
import sys
from pathlib import Path

from peftlab_bench.evaluation import measure_eval, measure_eval_precision
from peftlab_bench.reference import (
    measure_cell_reference,
    measure_reference,
    measure_reference_eval,
)
from peftlab_bench.runs import measure_cell_ours, measure_grid, measure_pack, measure_study
from peftlab_bench.training import (
    measure_curve,
    measure_matmul,
    measure_ours,
    measure_ours_losses,
)

WORKERS = {"ours": measure_ours, "reference": measure_reference, "eval": measure_eval,
           "reference-eval": measure_reference_eval, "matmul": measure_matmul,
           "ours-losses": measure_ours_losses, "curve": measure_curve,
           "cell-ours": measure_cell_ours, "cell-reference": measure_cell_reference,
           "grid": measure_grid, "eval-precision": measure_eval_precision,
           "pack": measure_pack, "study": measure_study}


if __name__ == "__main__":  # a measurement subprocess: kind, JSON kwargs, output file
    kind, kwargs, out_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    Path(out_file).write_text(json.dumps(WORKERS[kind](**kwargs)))
