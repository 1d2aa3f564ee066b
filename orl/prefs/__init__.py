"""Preference learning for control, split by concern:

- `orl.prefs.losses`: the Bradley–Terry loss every preference learner shares, pair accuracy;
- `orl.prefs.labels`: label files of segment pairs / scored segments, their checks, scripted (B-Pref) teachers;
- `orl.prefs.importers`: human labels from Uni-RLHF and Preference Transformer files;
- `orl.prefs.reward_model`: the MLP ensemble reward model; `orl.prefs.transformer`: the Preference Transformer;
- `orl.prefs.store`: reward models on disk and relabelling a dataset with one;
- `orl.prefs.buffers`: segment batches for agents that learn from preferences directly (CPL).

The command line (`orl-prefs`) lives in `orl.apps.prefs`.
"""
