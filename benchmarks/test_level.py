"""The report's test between methods in simulated studies: its level, its power, and the
family-wise error of the report's comparisons.

    python benchmarks/test_level.py [--sims 12000] [--studies 1000]

Null studies as in tests/test_report_stats.py: 872 test examples with 0/100 scores, 3 seeds,
two equally good methods (each right on its own examples), each seed shifting a method's
accuracy (seed SDs about 0.6, 1.2 and 3 points). Prints the rejection rate at 0.05, 0.01 and
0.001 of the crossed test and of the plug-in Satterthwaite test it replaced, their power when
one method is right on 8% more of the examples it got wrong, and, with 6 equally good
methods, the best chosen on validation, each method against the best and against full
fine-tuning (Holm): how often any pair is called significant.
"""

from __future__ import annotations

import argparse

import numpy as np

from peftlab.report.stats import crossed_test, holm, plug_in_satterthwaite_p

LOGIT_SDS = (0.01, 0.055, 0.16)
LEVELS = (0.05, 0.01, 0.001)


def scores(rng, sims: int, logit_sd: float, methods: int, size: int, seed_effect=None,
           seeds: int = 3):
    """0/100 scores: sims x methods x seeds x examples, and the seed effects used."""
    if seed_effect is None:
        seed_effect = rng.normal(0.0, logit_sd, (sims, methods, seeds, 1))
    difficulty = rng.normal(1.0, 1.0, (sims, 1, 1, size))
    per_example = rng.normal(0.0, 1.5, (sims, methods, 1, size))
    noise = rng.normal(0.0, 0.2, (sims, methods, seeds, size))
    return 100.0 * (difficulty + per_example + seed_effect + noise > 0), seed_effect


def level_and_power(sims: int) -> None:
    print(f"two methods, {sims} simulated studies each (872 examples, 3 seeds)")
    print("seed SD  shift  test        " + "  ".join(f"p<{a:<6}" for a in LEVELS))
    for logit_sd in LOGIT_SDS:
        for shift in (0.0, 0.08):
            rng = np.random.default_rng(5)
            x, _ = scores(rng, sims if shift == 0 else sims // 6, logit_sd, 2, 872)
            if shift:  # method 0 is right on `shift` of the examples it got wrong
                flip = (rng.random(x[:, 0].shape) < shift) & (x[:, 0] == 0)
                x[:, 0][flip] = 100.0
            seed_sd = float(np.sqrt(np.mean(x[:, 0].mean(-1).var(-1, ddof=1))))
            d = x[:, 0] - x[:, 1]
            for name, test in (("crossed", lambda m: crossed_test(m).p_value),
                               ("plug-in", plug_in_satterthwaite_p)):
                p = np.array([test(m) for m in d])
                rates = "  ".join(f"{np.mean(p < a):.4f}  " for a in LEVELS)
                print(f"{seed_sd:7.2f}  {shift:5.2f}  {name:10s}  {rates}")


def family(studies: int) -> None:
    print(f"6 equally good methods, {studies} simulated studies per seed SD: P(any pair "
          "significant after Holm), best chosen on 200 validation examples")
    for logit_sd in LOGIT_SDS:
        rng = np.random.default_rng(9)
        hits = {"crossed": 0, "plug-in": 0}
        sds = []
        for _ in range(studies):
            test, luck = scores(rng, 1, logit_sd, 6, 872)
            val, _ = scores(rng, 1, logit_sd, 6, 200, seed_effect=luck)
            test, val = test[0], val[0]
            sds.append(test[0].mean(-1).std(ddof=1))
            best, full = int(np.argmax(val.mean(axis=(1, 2)))), 0
            pairs = {(m, best) for m in range(6) if m != best}
            pairs |= {(m, full) for m in range(6) if m not in (best, full)}
            for name, test_fn in (("crossed", lambda m: crossed_test(m).p_value),
                                  ("plug-in", plug_in_satterthwaite_p)):
                p = holm([test_fn(test[a] - test[b]) for a, b in pairs])
                hits[name] += any(q < 0.05 for q in p)
        seed_sd = float(np.sqrt(np.mean(np.square(sds))))
        print(f"  seed SD {seed_sd:.2f}: crossed {hits['crossed'] / studies:.3f}, "
              f"plug-in {hits['plug-in'] / studies:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=12000)
    parser.add_argument("--studies", type=int, default=1000)
    args = parser.parse_args()
    level_and_power(args.sims)
    family(args.studies)


if __name__ == "__main__":
    main()
