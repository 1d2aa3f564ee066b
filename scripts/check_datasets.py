"""Are the local datasets the ones the README's numbers were measured on?

    python scripts/check_datasets.py                 # compare with results/datasets.json
    python scripts/check_datasets.py --record        # write results/datasets.json from the local datasets

orl collects its MuJoCo datasets itself (`orl-collect`), and a collection made on another processor or with
other torch/MuJoCo builds is other data. results/datasets.json holds the sha256 (as orl loads the arrays) of
every dataset the README's tables use; this script recomputes them here and says, per dataset, MATCH,
DIFFERENT or MISSING. Exit status 1 when any differs or is missing.

A DIFFERENT dataset may still be a recorded collection: the other `datasets*.json` files beside --file hold the
checksums of collections made on other processors (e.g. results/datasets_xeon.json, the data of
results/o2o_mujoco_xeon/), and the script names the one it matches, so its runs can be extended instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("orl/halfcheetah/medium-v0", "orl/halfcheetah/medium-replay-v0", "orl/hopper/medium-v0", "orl/hopper/medium-replay-v0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default=str(ROOT / "results" / "datasets.json"))
    parser.add_argument("--record", action="store_true", help="write the file from the local datasets")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = parser.parse_args()

    from orl.data import make_dataset
    from orl.errors import OrlError
    from orl.provenance import dataset_checksum, software

    local = {}
    for name in args.datasets:
        try:
            dataset = make_dataset(name, download=False)
        except OrlError as exc:
            local[name] = None
            print(f"{name}: MISSING ({str(exc).splitlines()[0]})")
            continue
        local[name] = {"sha256": dataset_checksum(dataset), "transitions": len(dataset),
                       "ref_min_score": dataset.ref_min_score, "ref_max_score": dataset.ref_max_score}
    if args.record:
        if any(v is None for v in local.values()):
            print("error: not every dataset is here; collect them first (README: Results on collected datasets)", file=sys.stderr)
            return 1
        import datetime

        record = {"datasets": local, "recorded": datetime.date.today().isoformat(), "recorded_with": software()}
        Path(args.file).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.file}")
        return 0
    recorded = json.loads(Path(args.file).read_text())["datasets"]
    others = {(path.relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path): json.loads(path.read_text())["datasets"] for path in sorted(Path(args.file).resolve().parent.glob("datasets*.json"))
              if path.resolve() != Path(args.file).resolve()}
    status = 0
    for name, found in local.items():
        if found is None:
            status = 1
            continue
        expected = recorded.get(name)
        if expected is None:
            print(f"{name}: NOT RECORDED in {args.file}")
            status = 1
        elif expected["sha256"] == found["sha256"]:
            print(f"{name}: MATCH ({found['sha256'][:12]})")
        else:
            print(f"{name}: DIFFERENT (here {found['sha256'][:12]}, {found['transitions']} transitions, expert {found['ref_max_score']:.0f}; "
                  f"README {expected['sha256'][:12]}, {expected['transitions']}, expert {expected['ref_max_score']:.0f})")
            for path, datasets in others.items():
                if datasets.get(name, {}).get("sha256") == found["sha256"]:
                    print(f"  {name} is the collection recorded in {path} (MATCH there)")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
