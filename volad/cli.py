"""The ``volad`` command line: data generation, benchmarks, evaluation."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("ignite").setLevel(logging.WARNING)
    if argv and argv[0] == "bench":
        from volad.bench import main as bench_main

        return bench_main(argv[1:])
    p = argparse.ArgumentParser(prog="volad", description="3D-first unsupervised anomaly detection in brain MRI")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the tiny synthetic dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--shape", type=int, default=24)
    s.add_argument("--seed", type=int, default=0)
    ph = sub.add_parser("phantom", help="write the real-anatomy phantom (MNI152-based)")
    ph.add_argument("--out", required=True)
    ph.add_argument("--spacing", type=float, default=2.0, choices=[1.0, 2.0, 3.0])
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--n_train", type=int, default=24)
    ph.add_argument("--n_val", type=int, default=6)
    ph.add_argument("--n_test", type=int, default=12)
    ev = sub.add_parser("evaluate", help="evaluate a run folder's maps against a dataset's labels")
    ev.add_argument("--run", required=True, help="run folder holding maps/index.json")
    ev.add_argument("--dataset", default="phantom")
    ev.add_argument("--data_root", default=None)
    ev.add_argument("--threshold_split", default="val")
    ev.add_argument("--test_split", default="test")
    sub.add_parser("bench", help="quality/speed/memory benchmarks (volad bench --help)")
    a = p.parse_args(argv)
    if a.cmd == "synth":
        from volad.data.synthetic import generate_synthetic

        print(generate_synthetic(a.out, shape=a.shape, seed=a.seed))
    elif a.cmd == "phantom":
        from volad.data.phantom import generate_phantom

        print(generate_phantom(a.out, spacing=a.spacing, seed=a.seed, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test))
    elif a.cmd == "evaluate":
        from volad.evaluation.evaluate import Evaluator

        Evaluator(output_dir=a.run, dataset=a.dataset, data_root=a.data_root, threshold_split=a.threshold_split, test_split=a.test_split).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
