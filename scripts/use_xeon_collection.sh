# Sourced by the o2o bench scripts, from the repository root: unpacks the Intel Xeon collection committed in
# results/o2o_mujoco_xeon/datasets.tgz into data/minari-xeon (never ~/.minari), points Minari at it, and checks both
# datasets against results/datasets_xeon.json. Returns non-zero, before any run starts, if either step fails.
mkdir -p data/minari-xeon && tar xzf results/o2o_mujoco_xeon/datasets.tgz -C data/minari-xeon || return 1
export MINARI_DATASETS_PATH=$PWD/data/minari-xeon
${PYTHON:-.venv/bin/python} scripts/check_datasets.py --file results/datasets_xeon.json \
  --datasets orl/hopper/medium-v0 orl/halfcheetah/medium-replay-v0 || return 1
