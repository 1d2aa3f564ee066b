"""Hydra configs of orl-train, orl-finetune and orl-collect (installed as package data of `orl.configs`)."""
