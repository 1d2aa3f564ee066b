"""The command-line apps (orl-train, orl-finetune, orl-collect, orl-prefs, orl-report's wiring): the one layer
that imports agents and environments by name. The library below it (orl's core, orl.agents, orl.envs) never
imports this package."""
